"""Background completion of "Retrieve predictions": a /predict's tasks are
claimed in the JobRunner (so a second click or an opened task does not
predict them twice), and those not finished by the deadline are handed to
it, which predicts them and writes them back to Label Studio. Without the
operator's Label Studio key, nothing is claimed or handed over."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from ray.serve.handle import DeploymentHandle

from mmdet_ls.failures import TaskFailure
from mmdet_ls.projects import project_key

logger = logging.getLogger("ray.serve")

CLAIM_TIMEOUT_S = 5.0  # the JobRunner answers in milliseconds; past this, predict without it
# Time kept for handing unfinished tasks over (one JobRunner call, then the
# answer is rendered) before predict_timeout_s: the images stop this early.
HANDOVER_S = 2.0
NO_KEY_HINT = ("not finished in time for Label Studio; retry later (set LABEL_STUDIO_API_KEY and LABEL_STUDIO_URL "
               "to have such tasks finished in the background and written back)")


def in_background(job: str, late: bool) -> TaskFailure:
    why = "not finished in time for Label Studio; " if late else ""
    return TaskFailure("in_background", f"{why}being predicted in the background ({job}); Label Studio shows "
                                        "the prediction once it is written back", retriable=True)


@dataclass
class Claim:
    project: int | None = None  # None: no background completion for this call
    owner: str = ""
    task_ids: dict[int, int] = field(default_factory=dict)  # task index -> task id, claimed by this call
    held: dict[int, TaskFailure] = field(default_factory=dict)  # task index -> why another path has it


class BackgroundCompletion:
    def __init__(self, jobs: DeploymentHandle | None, model_version: str):
        self.jobs = jobs
        self.model_version = model_version

    async def claim(self, project, tasks: list) -> Claim:
        key = project_key(project)
        if self.jobs is None or not key.isdigit():
            return Claim()
        ids = {i: t["id"] for i, t in enumerate(tasks)
               if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("data"), dict)}
        claim = Claim(int(key), "predict-" + uuid.uuid4().hex[:12], ids)
        if not ids:
            return claim
        try:
            held = await asyncio.wait_for(self.jobs.claim.remote(claim.project, list(ids.values()), claim.owner),
                                          CLAIM_TIMEOUT_S)
        except Exception as exc:  # the JobRunner is down: predict as without a key
            logger.warning("background completion unavailable (%s): predicting without it", type(exc).__name__)
            return Claim()
        index_of = {task_id: index for index, task_id in ids.items()}
        for task_id, holder in held.items():
            index = index_of[int(task_id)]
            claim.held[index] = (in_background(holder, late=False) if holder.startswith("job ") else TaskFailure(
                "in_progress", "being predicted by another call that is still running; Label Studio stores its "
                               "answer", retriable=True))
            del claim.task_ids[index]
        return claim

    async def hand_over(self, claim: Claim, tasks: list, jobs: list, outcomes: list, label_config: str
                        ) -> dict[int, TaskFailure]:
        """Failures to answer for the tasks that missed the deadline: handed
        over to the JobRunner, or (without it) a message naming the setting."""
        late = sorted({job.task_index for job, outcome in zip(jobs, outcomes, strict=True)
                       if isinstance(outcome, TaskFailure) and outcome.reason == "deadline"})
        if not late:
            return {}
        if claim.project is None:
            return {i: TaskFailure("deadline", NO_KEY_HINT, retriable=True) for i in late}
        mine = [i for i in late if i in claim.task_ids]
        payload = [{"id": tasks[i]["id"], "data": tasks[i]["data"]} for i in mine]
        try:
            answer = await asyncio.wait_for(
                self.jobs.background.remote(claim.project, payload, label_config, claim.owner), HANDOVER_S - 0.5)
        except Exception as exc:
            answer = {"error": f"the job runner did not take them ({type(exc).__name__})"}
        if "job" not in answer:
            return {i: TaskFailure("deadline", f"not finished in time for Label Studio; retry later "
                                               f"(background completion: {answer['error']})", retriable=True)
                    for i in late}
        for i in mine:
            del claim.task_ids[i]  # the job owns them now
        return {i: in_background(f"job {answer['job']}", late=True) for i in mine}

    async def release(self, claim: Claim, results: list[dict], linger_s: float) -> None:
        """This call's claims end: at once for tasks answered with an error,
        a while after the answer for predicted ones (Label Studio stores them
        meanwhile; a job must not predict them again)."""
        if claim.project is None or not claim.task_ids:
            return
        predicted = [task_id for index, task_id in claim.task_ids.items() if "result" in results[index]]
        failed = [task_id for index, task_id in claim.task_ids.items() if "result" not in results[index]]
        try:
            await asyncio.wait_for(self.jobs.release.remote(claim.project, predicted, failed, claim.owner, linger_s),
                                   CLAIM_TIMEOUT_S)
        except Exception as exc:
            logger.warning("could not release claims of %s (%s); they lapse with the runner", claim.owner,
                           type(exc).__name__)
