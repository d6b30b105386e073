# Toy 3-class RTMDet-Ins (instance masks) for the service tests (mmdet 3.x
# config, self-contained: no `_base_`, no pretrained weights, nothing is
# downloaded).
#
# The toy RTMDet of rtmdet_toy.py (same backbone and neck) with RTMDet-Ins's
# head (dynamic mask kernels, DiceLoss), so `pred_instances` carry `masks`,
# at a 480 px input (masks come from stride-8 features: 320 px left thin
# parts too coarse). train.py --masks starts from the box model's backbone and
# neck (load_from; mmdet's RTMDetInsSepBNHead shares one tower for classes and
# boxes, so the box head does not carry over), trains at 320 px, then
# fine-tunes at 480 px, on scenes with exact masks (scenes.make_scene_with_masks,
# COCO RLE); see README.md there.
#
# Inference: as rtmdet_toy.py (BGR uint8 arrays; LoadImageFromNDArray).

default_scope = 'mmdet'

classes = ('car', 'airplane', 'person')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 60, 230), (0, 160, 0)])
img_scale = (480, 480)  # stage 1 of train.py --masks trains at 320
data_root = 'data/toy_detector/'  # placeholder, overridden by the scripts
backend_args = None

norm_cfg = dict(type='BN')
act_cfg = dict(type='SiLU', inplace=True)

model = dict(
    type='RTMDet',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[103.53, 116.28, 123.675],
        std=[57.375, 57.12, 58.395],
        bgr_to_rgb=False,
        batch_augments=None),
    backbone=dict(
        type='CSPNeXt',
        arch='P5',
        expand_ratio=0.5,
        deepen_factor=0.167,
        widen_factor=0.25,
        channel_attention=True,
        norm_cfg=norm_cfg,
        act_cfg=act_cfg,
        init_cfg=None),  # no pretrained backbone
    neck=dict(
        type='CSPNeXtPAFPN',
        in_channels=[64, 128, 256],
        out_channels=64,
        num_csp_blocks=1,
        expand_ratio=0.5,
        norm_cfg=norm_cfg,
        act_cfg=act_cfg),
    bbox_head=dict(
        type='RTMDetInsSepBNHead',
        num_classes=len(classes),
        in_channels=64,
        stacked_convs=2,
        feat_channels=64,
        anchor_generator=dict(type='MlvlPointGenerator', offset=0, strides=[8, 16, 32]),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        loss_mask=dict(type='DiceLoss', loss_weight=2.0, eps=5e-6, reduction='mean'),
        share_conv=True,
        pred_kernel_size=1,
        norm_cfg=norm_cfg,
        act_cfg=act_cfg),
    train_cfg=dict(
        assigner=dict(type='DynamicSoftLabelAssigner', topk=13),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    # As RTMDet-Ins ships it: every kept instance gets a full-image mask, so a
    # near-zero score_thr would compute 100 masks per image for nothing.
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.6),
        max_per_img=100,
        mask_thr_binary=0.5),
)

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=True),  # RLE -> bitmaps
    # scale jitter around the 320 px input, then crop / pad back to 320x320
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.6, 1.4), keep_ratio=True),
    dict(type='RandomCrop', crop_size=img_scale, recompute_bbox=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(4, 4)),
    dict(type='YOLOXHSVRandomAug'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='PackDetInputs'),
]

test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]

train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    pin_memory=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        type='CocoDataset',
        data_root=data_root + 'train/',
        metainfo=metainfo,
        ann_file='annotations.json',
        data_prefix=dict(img='images/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline,
        backend_args=backend_args))

val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root + 'val/',
        metainfo=metainfo,
        ann_file='annotations.json',
        data_prefix=dict(img='images/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'val/annotations.json',
    metric=['bbox', 'segm'],
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

max_iters = 2000
base_lr = 0.004
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=base_lr, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True))

param_scheduler = [
    dict(type='LinearLR', start_factor=1.0e-5, by_epoch=False, begin=0, end=200),
    dict(
        type='CosineAnnealingLR',
        eta_min=base_lr * 0.05,
        begin=max_iters // 2,
        end=max_iters,
        T_max=max_iters // 2,
        by_epoch=False),
]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=max_iters, by_epoch=False, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))

custom_hooks = [
    # gamma 600 (YOLOX/RTMDet default 2000 is meant for far longer runs):
    # the EMA averages over the last ~150 iterations at the end of training
    dict(
        type='EMAHook',
        ema_type='ExpMomentumEMA',
        momentum=0.0002,
        gamma=600,
        update_buffers=True,
        priority=49),
]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
