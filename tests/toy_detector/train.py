"""Train the toy 3-class RTMDet on synthetic scenes (CPU) and write a plain,
small checkpoint for the service tests.

    nice -n 10 .venv/bin/python tests/toy_detector/train.py
    nice -n 10 .venv/bin/python tests/toy_detector/train.py --masks   # the RTMDet-Ins model

``--masks`` trains ``rtmdet_ins_toy.py`` (instance masks) instead, on
scenes that carry their exact masks (COCO RLE), in two stages, and writes
``rtmdet_ins_toy_3class.pth``:
  1. 2000 iterations at a 320 px input, from the box model's backbone and
     neck (``load_from``; the head from its init: mmdet's
     RTMDetInsSepBNHead shares one tower for classes and boxes, unlike the box
     model's head);
  2. 500 iterations at the config's 480 px input, lr 0.001, from stage 1: the
     masks come from stride-8 features, so the larger input is what brings
     thin parts (wings, legs) to mask IoU >= 0.85.
``--stage2-from PTH`` runs stage 2 only, from a stage-1 checkpoint.
Otherwise as below.

1. writes 2000 training scenes (seeds 0..1999) and 100 validation scenes
   (seeds 500000..500099) as COCO datasets into a temporary directory,
2. trains ``rtmdet_toy.py`` with mmdet's own training loop (mmengine Runner,
   3000 iterations of batch 8, AdamW lr 0.004, EMA) and validates once at
   the end with mmdet's CocoMetric,
3. saves ``rtmdet_toy_3class.pth`` next to this file with only
   ``state_dict`` (the EMA weights, CPU tensors) and
   ``meta = {'dataset_meta': {'classes': ..., 'palette': ...}, ...}``: no
   optimizer, message hub or other pickled objects, so that
   ``torch.load(weights_only=True)`` -- and hence mmdet's ``init_detector``
   -- loads it as is.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict

from scenes import CLASSES, write_coco_dataset  # next to this script

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIG = os.path.join(HERE, 'rtmdet_toy.py')
DEFAULT_OUT = os.path.join(HERE, 'rtmdet_toy_3class.pth')
INS_CONFIG = os.path.join(HERE, 'rtmdet_ins_toy.py')
INS_OUT = os.path.join(HERE, 'rtmdet_ins_toy_3class.pth')
TRAIN_SEED_OFFSET = 0
VAL_SEED_OFFSET = 500_000


def set_data_root(cfg, root: str) -> None:
    """Point the train / val / test dataloaders and evaluators of ``cfg`` at
    ``root/train`` and ``root/val`` (each with images/ and annotations.json)."""
    train_root = os.path.join(root, 'train') + os.sep
    val_root = os.path.join(root, 'val') + os.sep
    cfg.train_dataloader.dataset.data_root = train_root
    for key in ('val_dataloader', 'test_dataloader'):
        if cfg.get(key) is not None:
            cfg[key].dataset.data_root = val_root
    for key in ('val_evaluator', 'test_evaluator'):
        if cfg.get(key) is not None:
            cfg[key].ann_file = os.path.join(val_root, 'annotations.json')


def set_train_scale(cfg, side: int) -> None:
    """Train (and validate) at a side x side input instead of the config's."""
    scale = (side, side)
    for step in cfg.train_dataloader.dataset.pipeline:
        if step.type == 'RandomResize':
            step.scale = scale
        elif step.type == 'RandomCrop':
            step.crop_size = scale
        elif step.type == 'Pad':
            step.size = scale
    for key in ('val_dataloader', 'test_dataloader'):
        for step in (cfg.get(key) or {}).get('dataset', {}).get('pipeline', []):
            if step.type in ('Resize', 'Pad'):
                step['scale' if step.type == 'Resize' else 'size'] = scale


def plain_checkpoint(src_path: str, dst_path: str, extra_meta: dict) -> None:
    """Strip an mmengine checkpoint down to ``state_dict`` + ``meta``."""
    import torch

    ckpt = torch.load(src_path, map_location='cpu', weights_only=False)
    state = ckpt['state_dict']  # EMAHook swaps the EMA weights in here
    plain_state = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v.detach().cpu().contiguous().clone())
        for k, v in state.items())
    from mmengine.config import Config
    metainfo = Config.fromfile(CONFIG).metainfo
    meta = {
        'dataset_meta': {
            'classes': tuple(CLASSES),
            'palette': [tuple(int(c) for c in p) for p in metainfo['palette']],
        },
    }
    meta.update(extra_meta)
    torch.save({'state_dict': plain_state, 'meta': meta}, dst_path)
    # must load without unpickling arbitrary objects
    torch.load(dst_path, map_location='cpu', weights_only=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n-train', type=int, default=2000)
    ap.add_argument('--n-val', type=int, default=100)
    ap.add_argument('--masks', action='store_true', help='train the instance-mask model (rtmdet_ins_toy.py)')
    ap.add_argument('--iters', type=int, default=None, help='default: 3000, or 2000 (stage 1) with --masks')
    ap.add_argument('--stage2-iters', type=int, default=500)
    ap.add_argument('--stage2-from', default=None, help='--masks: skip stage 1, fine-tune this checkpoint')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', default=None, help='default: rtmdet_toy_3class.pth / rtmdet_ins_toy_3class.pth')
    ap.add_argument('--work-dir', default=None,
                    help='keep data, logs and the full checkpoint here (default: temp dir, removed)')
    args = ap.parse_args(argv)
    config = INS_CONFIG if args.masks else CONFIG
    args.iters = args.iters or (2000 if args.masks else 3000)
    args.out = args.out or (INS_OUT if args.masks else DEFAULT_OUT)

    t_start = time.time()
    import torch
    torch.set_num_threads(args.threads)
    from mmengine.config import Config
    from mmengine.runner import Runner

    work = args.work_dir or tempfile.mkdtemp(prefix='toy_rtmdet_')
    os.makedirs(work, exist_ok=True)
    data_root = os.path.join(work, 'data')
    if not os.path.exists(os.path.join(data_root, 'val', 'annotations.json')):  # a kept --work-dir has them
        print(f'writing {args.n_train} train + {args.n_val} val scenes to {data_root}', flush=True)
        write_coco_dataset(os.path.join(data_root, 'train'), args.n_train, TRAIN_SEED_OFFSET, with_masks=args.masks)
        write_coco_dataset(os.path.join(data_root, 'val'), args.n_val, VAL_SEED_OFFSET, with_masks=args.masks)
    t_data = time.time()
    print(f'data written in {t_data - t_start:.0f} s', flush=True)

    def train_stage(name: str, iters: int, load_from: str, scale: int | None = None,
                    lr: float | None = None) -> str:
        """One mmengine training run; returns its last full checkpoint."""
        cfg = Config.fromfile(config)
        set_data_root(cfg, data_root)
        if scale is not None:
            set_train_scale(cfg, scale)
        if lr is not None:
            cfg.optim_wrapper.optimizer.lr = lr
            cfg.param_scheduler[1].eta_min = lr * 0.05
            cfg.param_scheduler[0].end = min(200, iters // 10)
        cfg.load_from = load_from
        cfg.work_dir = os.path.join(work, name)
        cfg.train_cfg.max_iters = iters
        cfg.train_cfg.val_interval = iters
        cfg.default_hooks.checkpoint.interval = iters
        # keep the schedule proportional when the iterations change
        cfg.param_scheduler[1].begin = iters // 2
        cfg.param_scheduler[1].end = iters
        cfg.param_scheduler[1].T_max = iters - iters // 2
        if args.n_val <= 0:
            cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
        Runner.from_cfg(cfg).train()
        ckpts = sorted(glob.glob(os.path.join(cfg.work_dir, 'iter_*.pth')),
                       key=lambda p: int(os.path.basename(p)[5:-4]))
        if not ckpts:
            raise SystemExit('no checkpoint was written')
        return ckpts[-1]

    if not args.masks:
        last = train_stage('work_dir', args.iters, None)
    else:
        stage1 = args.stage2_from or train_stage('stage1', args.iters, DEFAULT_OUT, scale=320)
        last = train_stage('stage2', args.stage2_iters, stage1, lr=0.001)
    t_train = time.time()

    import mmdet
    plain_checkpoint(last, args.out, {
        'mmdet_version': mmdet.__version__,
        'iters': int(args.iters) + (int(args.stage2_iters) if args.masks else 0),
        'n_train_images': int(args.n_train),
        'trained_with': 'tests/toy_detector/train.py' + (' --masks' if args.masks else ''),
    })
    size_mb = os.path.getsize(args.out) / 2**20
    print(f'wrote {args.out} ({size_mb:.1f} MiB)')
    print(f'TIME data {t_data - t_start:.0f} s, training {t_train - t_data:.0f} s '
          f'({(t_train - t_data) / 60:.1f} min), total {time.time() - t_start:.0f} s', flush=True)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
