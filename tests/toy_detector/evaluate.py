"""Measure the toy detector on held-out synthetic scenes.

    PYTHONPATH=. .venv/bin/python tests/toy_detector/evaluate.py

(from the repository root: PYTHONPATH=. makes bench.provenance importable;
scenes.py is found next to this script).

    PYTHONPATH=. .venv/bin/python tests/toy_detector/evaluate.py --masks

measures the instance-mask model (rtmdet_ins_toy.py, rtmdet_ins_toy_3class.pth)
the same way, plus COCO segm mAP and mAP@0.5 against the scenes' exact masks
(``make_scene_with_masks``) and recall at mask IoU >= 0.85; written to
``evaluate_ins_result.json``.

Loads ``rtmdet_toy_3class.pth`` with plain ``mmdet.apis.init_detector`` (no
monkeypatching; the checkpoint only holds tensors, dicts, tuples and
strings so torch's ``weights_only=True`` loader accepts it), runs
``inference_detector`` on BGR numpy arrays (the first pipeline step becomes
``mmdet.LoadImageFromNDArray``, as in the service) and reports, per set:

* COCO bbox mAP (0.5:0.95) and mAP@0.5 (pycocotools ``COCOeval``),
* recall@IoU0.8: the fraction of ground-truth objects matched by a
  prediction of the right class with score >= 0.5 and IoU >= 0.8,
* false positives at score >= 0.5 (predictions with IoU < 0.5 to every
  ground-truth object of their class), per image.

Sets (seeds never used for training, which used 0..1999 and 500000..):
``heldout`` scenes 1000000.. at the default 256-416 px sizes,
``gray`` the same scenes in grayscale, ``large`` 2000x900 scenes with
scaled-up objects (seeds 2000000..).

The results are written to ``evaluate_result.json`` next to this script
(``--json`` to change), with their provenance: git commit and uncommitted
paths, the arguments, the checkpoint's sha256 and the machine
(bench/provenance.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
from scenes import CLASSES, iou, make_scene, make_scene_with_masks, to_grayscale  # next to this script

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIG = os.path.join(HERE, 'rtmdet_toy.py')
CHECKPOINT = os.path.join(HERE, 'rtmdet_toy_3class.pth')
RESULT = os.path.join(HERE, 'evaluate_result.json')
INS_CONFIG = os.path.join(HERE, 'rtmdet_ins_toy.py')
INS_CHECKPOINT = os.path.join(HERE, 'rtmdet_ins_toy_3class.pth')
INS_RESULT = os.path.join(HERE, 'evaluate_ins_result.json')


def rle(mask):
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    r['counts'] = r['counts'].decode('ascii')
    return r


def coco_map(gts, preds, iou_type='bbox'):
    """gts: list per image of [(label_idx, box[, mask RLE])], preds: list per
    image of [(label_idx, box, score[, mask RLE])].  Returns (mAP, mAP@0.5)
    via pycocotools, of boxes or (iou_type='segm') of masks."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (g, p) in enumerate(zip(gts, preds), start=1):
        images.append({'id': i, 'width': 1, 'height': 1})
        for lab, b, *m in g:
            anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': lab + 1,
                         'bbox': [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         'area': (b[2] - b[0]) * (b[3] - b[1]), 'iscrowd': 0,
                         **({'segmentation': m[0]} if m else {})})
        for lab, b, s, *m in p:
            dets.append({'image_id': i, 'category_id': lab + 1,
                         'bbox': [b[0], b[1], b[2] - b[0], b[3] - b[1]], 'score': s,
                         **({'segmentation': m[0]} if m else {})})
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {'images': images, 'annotations': anns,
                        'categories': [{'id': i + 1, 'name': c}
                                       for i, c in enumerate(CLASSES)]}
        coco.createIndex()
    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(dets)
        ev = COCOeval(coco, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def evaluate_set(model, scenes, score_thr=0.5, iou_thr=0.8, masks=False, mask_iou_thr=0.85):
    from mmdet.apis import inference_detector

    gts, preds = [], []
    n_gt = n_hit = n_fp = 0
    worst = []
    mask_gts, mask_preds, mask_best = [], [], []
    t0 = time.time()
    for name, img, objects in scenes:
        bgr = np.ascontiguousarray(np.asarray(img.convert('RGB'))[:, :, ::-1])
        res = inference_detector(model, bgr).pred_instances
        boxes = res.bboxes.numpy().tolist()
        scores = res.scores.numpy().tolist()
        labels = res.labels.numpy().tolist()
        g = [(CLASSES.index(o['label']), o['bbox']) for o in objects]
        p = list(zip(labels, boxes, scores))
        gts.append(g)
        preds.append(p)
        if masks:
            pm = res.masks.numpy()
            mask_gts.append([(CLASSES.index(o['label']), o['bbox'], rle(o['mask'])) for o in objects])
            mask_preds.append([(lab, b, s, rle(m)) for (lab, b, s), m in zip(p, pm)])
            for o in objects:  # best mask IoU of a confident prediction of its class
                lab = CLASSES.index(o['label'])
                best = max([float((m & o['mask']).sum() / max(1, (m | o['mask']).sum()))
                            for (pl, _, s), m in zip(p, pm) if pl == lab and s >= score_thr], default=0.0)
                mask_best.append((best, name, o['label'], o['bbox']))
        confident = [(lab, b) for lab, b, s in p if s >= score_thr]
        for lab, b in g:
            best = max([iou(b, pb) for pl, pb in confident if pl == lab], default=0.0)
            n_gt += 1
            n_hit += best >= iou_thr
            worst.append((best, name, CLASSES[lab], b))
        for lab, b in confident:
            if max([iou(b, gb) for gl, gb in g if gl == lab], default=0.0) < 0.5:
                n_fp += 1
    secs = time.time() - t0
    m, m50 = coco_map(gts, preds)
    worst.sort(key=lambda t: t[0])
    extra = {}
    if masks:
        sm, sm50 = coco_map(mask_gts, mask_preds, 'segm')
        mask_best.sort(key=lambda t: t[0])
        extra = {'mask_mAP': round(sm, 4), 'mask_mAP50': round(sm50, 4),
                 f'recall_mask_iou{mask_iou_thr}_score{score_thr}':
                     round(sum(b[0] >= mask_iou_thr for b in mask_best) / max(1, len(mask_best)), 4),
                 'mean_best_mask_iou': round(float(np.mean([b[0] for b in mask_best])), 4),
                 'worst_masks': [(round(w[0], 3), w[1], w[2], w[3]) for w in mask_best[:5]]}
    return {**extra,
        'images': len(scenes), 'objects': n_gt, 'mAP': round(m, 4), 'mAP50': round(m50, 4),
        f'recall_iou{iou_thr}_score{score_thr}': round(n_hit / max(1, n_gt), 4),
        'false_pos_per_image': round(n_fp / max(1, len(scenes)), 4),
        'worst_matches': [(round(w[0], 3), w[1], w[2], w[3]) for w in worst[:5]],
        'sec_per_image': round(secs / max(1, len(scenes)), 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--masks', action='store_true', help='the instance-mask model, with mask metrics')
    ap.add_argument('--config', default=None, help='default: rtmdet_toy.py, or rtmdet_ins_toy.py with --masks')
    ap.add_argument('--checkpoint', default=None)
    ap.add_argument('--n', type=int, default=200, help='held-out scenes (and grayscale copies)')
    ap.add_argument('--n-large', type=int, default=50, help='2000x900 scenes')
    ap.add_argument('--seed-offset', type=int, default=1_000_000)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--json', default=None, help='default: evaluate_result.json, evaluate_ins_result.json')
    args = ap.parse_args(argv)
    args.config = args.config or (INS_CONFIG if args.masks else CONFIG)
    args.checkpoint = args.checkpoint or (INS_CHECKPOINT if args.masks else CHECKPOINT)
    args.json = args.json or (INS_RESULT if args.masks else RESULT)
    scene_of = make_scene_with_masks if args.masks else make_scene
    from bench.provenance import provenance
    with open(args.checkpoint, 'rb') as f:
        checkpoint_sha256 = hashlib.sha256(f.read()).hexdigest()
    run_info = provenance({**{k: v for k, v in vars(args).items() if k != 'json'},
                           'checkpoint_sha256': checkpoint_sha256})
    started = time.time()

    import torch
    torch.set_num_threads(args.threads)
    from mmdet.apis import init_detector

    # the checkpoint must load with torch's safe loader as is
    ck = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
    assert set(ck) == {'state_dict', 'meta'}, sorted(ck)

    model = init_detector(args.config, args.checkpoint, device='cpu')
    classes = tuple(model.dataset_meta['classes'])
    assert classes == CLASSES, classes
    print('init_detector OK, classes:', classes, flush=True)

    heldout = []
    for i in range(args.n):
        seed = args.seed_offset + i
        img, objs = scene_of(seed)
        heldout.append((f'seed{seed}', img, objs))
    gray = [(n + '/gray', to_grayscale(img), objs) for n, img, objs in heldout]
    large = []
    for i in range(args.n_large):
        seed = 2 * args.seed_offset + i
        img, objs = scene_of(seed, 2000, 900)
        large.append((f'seed{seed}/2000x900', img, objs))

    results = {}
    for name, scenes in (('heldout', heldout), ('gray', gray), ('large', large)):
        if not scenes:
            continue
        r = evaluate_set(model, scenes, masks=args.masks)
        results[name] = r
        print(name, json.dumps(r), flush=True)
    with open(args.json, 'w') as f:
        json.dump({'provenance': run_info, 'wall_s': round(time.time() - started, 1), 'sets': results}, f, indent=1)
        f.write('\n')
    print('result written to', args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
