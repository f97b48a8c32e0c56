"""Detectron's option tree with its default values.

Every key of facebookresearch/Detectron ``detectron/core/config.py`` (2018-2019 master) is here with its
default, plus every key that roytseng-tw/Detectron.pytorch ``lib/core/config.py`` added, so that a YAML written
for either project merges unchanged. Where both define a key with different defaults, Detectron wins
(``TRAIN.SNAPSHOT_ITERS``, ``OUTPUT_DIR``). Keys without effect in a PyTorch port (Caffe2 execution, memonger,
NCCL, MATLAB...) are kept so old YAMLs keep loading; the code simply never reads them.

pydetectron's own additions (not in either project)
---------------------------------------------------
- ``PIXEL_STDS``                  (1, 1, 3) divisor applied after subtracting ``PIXEL_MEANS``; ones = Detectron.
- ``MODEL.INPUT_COLOR_ORDER``     'BGR' (Detectron/Caffe2 weights) or 'RGB' (torchvision-style weights);
                                  ``PIXEL_MEANS``/``PIXEL_STDS`` are always given in that same order.
- ``SOLVER.TYPE``                 Detectron.pytorch's optimizer selector, extended: 'SGD' | 'Adam' | 'AdamW'.
- ``SOLVER.BETAS``                (beta1, beta2) for Adam/AdamW.
- ``SOLVER.LAYER_WISE_LR_DECAY``  a parameter d layers below the top gets lr x decay ** d; 1.0 = off.
- ``SOLVER.LAYER_WISE_LR_DECAY_GROUPS`` what a layer is: 'spark' (SparK's grouping: stem; res2; res3; res4 in
  groups of three blocks; res5; everything else at full lr) or 'per_block' (one layer per residual block).
- ``TEST.EVAL_PERIOD``            evaluate every N training iterations; 0 = only at the end.
- ``TRAIN.SCALE_SAMPLING``        'choice' (one of TRAIN.SCALES per image, Detectron) | 'range' (TRAIN.SCALES =
                                  (lo, hi), an integer size drawn in [lo, hi]: detectron2's MIN_SIZE_TRAIN_SAMPLING).
- ``SOLVER.LR_IN_MOMENTUM``       True: Caffe2's SGD momentum (lr inside the buffer, SCALE_MOMENTUM); False:
                                  torch.optim.SGD as detectron2 runs it (the buffer is never rescaled).
- ``SOLVER.IMS_PER_BATCH``        detectron2's total batch over all processes (0 = off: NUM_GPUS x
                                  TRAIN.IMS_PER_BATCH); split over the run's devices at launch, schedule unscaled.
- ``TEST.PRECISE_BN.ENABLED/NUM_ITER``  detectron2's PreciseBN: before each evaluation, BatchNorm running
                                  statistics are recomputed as the true average over NUM_ITER training batches.
- ``SOLVER.CLIP_GRADIENTS.*``     detectron2's gradient clipping (ENABLED, CLIP_TYPE 'value' | 'norm',
                                  CLIP_VALUE, NORM_TYPE), applied to each parameter's gradient separately.
- ``SOLVER.AMP.ENABLED``          mixed precision (detectron2's key): float16 autocast + GradScaler on CUDA,
                                  bfloat16 autocast on the CPU; losses and box decoding stay float32. Used by
                                  training and by test_net.py's inference (``--amp`` sets it).
- ``KRCNN.OKS_SIGMAS``            per-keypoint OKS sigmas for evaluation; () = COCO person sigmas.
- ``FAST_RCNN.ROI_XFORM_ALIGNED``, ``MRCNN.ROI_XFORM_ALIGNED``, ``KRCNN.ROI_XFORM_ALIGNED``
                                  RoIAlign with the half-pixel offset (detectron2 style); False = Caffe2.
- ``FAST_RCNN.SMOOTH_L1_BETA`` / ``BBOX_REG_LOSS_TYPE`` / ``BBOX_REG_LOSS_WEIGHT``, ``FAST_RCNN.NUM_FC`` / ``NORM``,
  ``MRCNN.NUM_CONV`` / ``NORM``, ``TRAIN.PROPOSAL_APPEND_GT``  detectron2's ROI-head keys (see their comments).
- ``RESNETS.NORM``                'AffineChannel' (frozen BN, Detectron) | 'GN' | 'BN' | 'SyncBN' (trainable).
                                  ``RESNETS.USE_GN`` and '*_gn_*' ``TRANS_FUNC``/``STEM_FUNC``/``SHORTCUT_FUNC``
                                  names imply 'GN' (reconciled by ``assert_and_infer_cfg``).
- ``RESNETS.ENABLE_STAGE_LAST_NORM`` MGD's student body: trainable GroupNorm(32) in each stage's last block.
- ``DISTILL.*``                   teacher/student distillation: ``METHOD`` ('' | 'mgd' | 'feature_l2'),
                                  ``TEACHER_CFG``, ``TEACHER_WEIGHTS``, per-stage ``LOSS_FACTORS`` (C2..C5
                                  divisors), ``IGNORE_INDS``, and ``MGD.REDUCER`` / ``UPDATE_FREQ`` /
                                  ``UPDATE_SLOW_STEP`` / ``UPDATE_ITER`` / ``TEACHER_BN_WEIGHTS``.
- ``DOWNLOAD_CACHE``              Detectron's key with Detectron's directory name, moved from /tmp to the user's
                                  cache folder ($XDG_CACHE_HOME or ~/.cache) so downloads survive a reboot.
ResNet-18/34 (basic blocks) need no key: the block kind follows the depth in the body name.
"""

from __future__ import annotations

import math
import os

import numpy as np

from pydetectron.config.node import CfgNode

# The project root (``<root>/lib/pydetectron/config/defaults.py``); Detectron.pytorch's ROOT_DIR convention.
_PROJECT_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _train(C: CfgNode) -> None:
    T = C.TRAIN = CfgNode()
    T.WEIGHTS = ""  # initial weights (.pkl / .pth / URL)
    T.DATASETS = ()  # names from the dataset catalog; several = their union
    T.SCALES = (600,)  # shortest-side sizes, one picked at random per image
    # pydetectron (detectron2's INPUT.MIN_SIZE_TRAIN_SAMPLING): 'choice' = one of TRAIN.SCALES per image
    # (Detectron); 'range' = TRAIN.SCALES is (lo, hi) and each image draws an integer size in [lo, hi]
    T.SCALE_SAMPLING = "choice"
    T.MAX_SIZE = 1000  # cap on the longest side
    T.IMS_PER_BATCH = 2  # images per GPU
    T.BATCH_SIZE_PER_IM = 64  # sampled RoIs per image
    T.FG_FRACTION = 0.25
    T.FG_THRESH = 0.5  # IoU >= this: foreground RoI
    T.BG_THRESH_HI = 0.5  # background RoIs have IoU in [LO, HI)
    T.BG_THRESH_LO = 0.0
    T.USE_FLIPPED = True
    T.BBOX_THRESH = 0.5  # IoU needed for a RoI to be a box-regression example
    # pydetectron (detectron2's ROI_HEADS.PROPOSAL_APPEND_GT): the gt boxes join the RoI candidates (Detectron
    # always does it); False is detectron2 mode only
    T.PROPOSAL_APPEND_GT = True
    T.SNAPSHOT_ITERS = 80000
    T.PROPOSAL_FILES = ()  # precomputed proposals, one file per dataset
    T.ASPECT_GROUPING = True  # batch images of similar aspect ratio together
    T.GENERATE_PROPOSALS_ON_GPU = False
    # RPN training
    T.RPN_POSITIVE_OVERLAP = 0.7
    T.RPN_NEGATIVE_OVERLAP = 0.3
    T.RPN_FG_FRACTION = 0.5
    T.RPN_BATCH_SIZE_PER_IM = 256
    T.RPN_NMS_THRESH = 0.7
    T.RPN_PRE_NMS_TOP_N = 12000  # per FPN level with FPN
    T.RPN_POST_NMS_TOP_N = 2000  # total over levels
    T.RPN_STRADDLE_THRESH = 0  # drop anchors this far outside the image; -1 keeps all
    T.RPN_MIN_SIZE = 0  # at the original image scale
    T.CROWD_FILTER_THRESH = 0.7
    T.GT_MIN_AREA = -1
    T.FREEZE_CONV_BODY = False
    T.AUTO_RESUME = True
    T.COPY_WEIGHTS = False
    T.FREEZE_AT = 2  # Detectron's name; RESNETS.FREEZE_AT is Detectron.pytorch's (kept equal by the checks)
    # Detectron.pytorch additions
    T.BBOX_NORMALIZE_TARGETS = True
    T.BBOX_INSIDE_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    T.BBOX_NORMALIZE_TARGETS_PRECOMPUTED = False
    T.BBOX_NORMALIZE_MEANS = (0.0, 0.0, 0.0, 0.0)
    T.BBOX_NORMALIZE_STDS = (0.1, 0.1, 0.2, 0.2)
    T.ASPECT_CROPPING = False
    T.ASPECT_HI = 2
    T.ASPECT_LO = 0.5


def _data_loader(C: CfgNode) -> None:
    D = C.DATA_LOADER = CfgNode()
    D.NUM_THREADS = 4
    D.MINIBATCH_QUEUE_SIZE = 64
    D.BLOBS_QUEUE_CAPACITY = 8


def _aug(heuristics: dict[str, str], area_thresholds: dict[str, int]) -> CfgNode:
    """One test-time augmentation section (BBOX_AUG / MASK_AUG / KPS_AUG share this layout)."""
    A = CfgNode()
    A.ENABLED = False
    A.update(heuristics)  # how predictions of the augmented copies are combined
    A.H_FLIP = False
    A.SCALES = ()
    A.MAX_SIZE = 4000
    A.SCALE_H_FLIP = False
    A.SCALE_SIZE_DEP = False
    A.update(area_thresholds)
    A.ASPECT_RATIOS = ()
    A.ASPECT_RATIO_H_FLIP = False
    return A


def _test(C: CfgNode) -> None:
    T = C.TEST = CfgNode()
    T.WEIGHTS = ""
    T.DATASETS = ()
    T.SCALE = 600
    T.MAX_SIZE = 1000
    T.NMS = 0.3  # per-class NMS IoU threshold
    T.BBOX_REG = True
    T.PROPOSAL_FILES = ()
    T.GENERATE_PROPOSALS_ON_GPU = False
    T.PROPOSAL_LIMIT = 2000
    T.RPN_NMS_THRESH = 0.7
    T.RPN_PRE_NMS_TOP_N = 12000
    T.RPN_POST_NMS_TOP_N = 2000
    T.RPN_MIN_SIZE = 0
    T.DETECTIONS_PER_IM = 100
    T.SCORE_THRESH = 0.05
    T.COMPETITION_MODE = True
    T.FORCE_JSON_DATASET_EVAL = False
    T.PRECOMPUTED_PROPOSALS = True  # inferred: False when the model has an RPN (or is RetinaNet)
    T.CLASS_SPECIFIC_AR = False
    T.EVAL_PERIOD = 0  # pydetectron: periodic evaluation during training; 0 = off
    P = T.PRECISE_BN = CfgNode()  # detectron2's: recompute BN statistics before each evaluation
    P.ENABLED = False
    P.NUM_ITER = 200  # training batches (per process) the statistics are averaged over
    T.BBOX_AUG = _aug({"SCORE_HEUR": "UNION", "COORD_HEUR": "UNION"},
                      {"AREA_TH_LO": 50**2, "AREA_TH_HI": 180**2})
    T.MASK_AUG = _aug({"HEUR": "SOFT_AVG"}, {"AREA_TH": 180**2})  # SOFT_AVG | SOFT_MAX | LOGIT_AVG
    T.KPS_AUG = _aug({"HEUR": "HM_AVG"}, {"AREA_TH": 180**2})  # HM_AVG | HM_MAX
    S = T.SOFT_NMS = CfgNode()
    S.ENABLED = False
    S.METHOD = "linear"
    S.SIGMA = 0.5
    V = T.BBOX_VOTE = CfgNode()
    V.ENABLED = False
    V.VOTE_TH = 0.8
    V.SCORING_METHOD = "ID"
    V.SCORING_METHOD_BETA = 1.0


def _model(C: CfgNode) -> None:
    M = C.MODEL = CfgNode()
    M.TYPE = ""  # 'generalized_rcnn' (also accepts Detectron's legacy names)
    M.CONV_BODY = ""  # e.g. 'FPN.add_fpn_ResNet50_conv5_body' or 'FPN.fpn_ResNet50_conv5_body'
    M.NUM_CLASSES = -1  # including background, e.g. 81 for COCO
    M.CLS_AGNOSTIC_BBOX_REG = False
    M.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    M.FASTER_RCNN = False  # RPN + Fast R-CNN trained end to end
    M.MASK_ON = False
    M.KEYPOINTS_ON = False
    M.RPN_ONLY = False
    M.EXECUTION_TYPE = "dag"  # Caffe2 only
    # Detectron.pytorch additions
    M.SHARE_RES5 = False  # inferred from the mask/keypoint head name
    M.LOAD_IMAGENET_PRETRAINED_WEIGHTS = True
    M.UNSUPERVISED_POSE = False
    # pydetectron
    M.INPUT_COLOR_ORDER = "BGR"
    M.ROI_HEADS_NAME = "DetectronROIHeads"  # the box / mask / keypoint cascade (registry kind 'roi_heads')
    # 'detectron' | 'detectron2': whose numerics the model, data and evaluation follow (boxes with or without +1,
    # anchors, matching, sampling, proposals, losses, inference). A detectron2 YAML (--config-file) sets
    # 'detectron2'; a Detectron-style YAML may set it too.
    M.CONVENTIONS = "detectron"
    # detectron2's ANCHOR_GENERATOR.OFFSET: anchor centres at (x + offset) * stride, offset in [0, 1).
    # detectron2 mode only (Detectron's anchors have their own fixed placement); 0.0 = detectron2's default.
    M.ANCHOR_OFFSET = 0.0


def _retinanet(C: CfgNode) -> None:
    R = C.RETINANET = CfgNode()
    R.RETINANET_ON = False
    R.ASPECT_RATIOS = (0.5, 1.0, 2.0)
    R.SCALES_PER_OCTAVE = 3
    R.ANCHOR_SCALE = 4
    R.NUM_CONVS = 4
    R.BBOX_REG_WEIGHT = 1.0
    R.BBOX_REG_BETA = 0.11
    R.PRE_NMS_TOP_N = 1000
    R.POSITIVE_OVERLAP = 0.5
    R.NEGATIVE_OVERLAP = 0.4
    R.LOSS_ALPHA = 0.25
    R.LOSS_GAMMA = 2.0
    R.PRIOR_PROB = 0.01
    R.SHARE_CLS_BBOX_TOWER = False
    R.CLASS_SPECIFIC_BBOX = False
    R.SOFTMAX = False
    R.INFERENCE_TH = 0.05
    # pydetectron (detectron2's RETINANET.NORM 'GN'): GroupNorm after each tower conv, MSRA-initialised convs
    R.USE_GN = False
    # pydetectron, for detectron2 mode (issue 15). The norm after each tower conv: '' (Detectron's head) or 'GN'
    # (= USE_GN; in detectron2 mode the tower convs keep detectron2's Gaussian(0.01) init). detectron2's BN /
    # SyncBN (one norm per level) and shared FrozenBN heads are refused.
    R.NORM = ""
    # The box loss: 'smooth_l1' (BBOX_REG_BETA; Detectron's) or 'giou' (detectron2 mode only).
    R.BBOX_REG_LOSS_TYPE = "smooth_l1"
    # (wx, wy, ww, wh) of the box coder (detectron2's RETINANET.BBOX_REG_WEIGHTS; Detectron's are all 1).
    R.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def _solver(C: CfgNode) -> None:
    S = C.SOLVER = CfgNode()
    S.TYPE = "SGD"  # Detectron.pytorch: 'SGD' | 'Adam'; pydetectron adds 'AdamW'
    S.BASE_LR = 0.001
    S.LR_POLICY = "step"  # step | steps_with_decay | steps_with_lrs | cosine_decay
    S.GAMMA = 0.1
    S.STEP_SIZE = 30000
    S.STEPS = []
    S.LRS = []
    S.MAX_ITER = 40000
    S.MOMENTUM = 0.9
    S.WEIGHT_DECAY = 0.0005
    S.WEIGHT_DECAY_GN = 0.0
    S.WARM_UP_ITERS = 500
    S.WARM_UP_FACTOR = 1.0 / 3.0
    S.WARM_UP_METHOD = "linear"  # 'constant' | 'linear'
    S.SCALE_MOMENTUM = True
    S.SCALE_MOMENTUM_THRESHOLD = 1.1
    # pydetectron: True = Caffe2's SGD, whose momentum buffer holds the lr (so SCALE_MOMENTUM applies: Detectron);
    # False = torch.optim.SGD as detectron2 runs it: an lr change never touches the buffer
    S.LR_IN_MOMENTUM = True
    S.LOG_LR_CHANGE_THRESHOLD = 1.1
    # Detectron.pytorch additions
    S.BIAS_DOUBLE_LR = True
    S.BIAS_WEIGHT_DECAY = False
    # pydetectron
    S.BETAS = (0.9, 0.999)
    S.LAYER_WISE_LR_DECAY = 1.0
    S.LAYER_WISE_LR_DECAY_GROUPS = "spark"  # 'spark' (SparK's lr_factor_func) | 'per_block'
    G = S.CLIP_GRADIENTS = CfgNode()  # detectron2's keys and meaning: each parameter's gradient clipped alone
    G.ENABLED = False
    G.CLIP_TYPE = "value"  # 'value': every element into [-CLIP_VALUE, CLIP_VALUE]; 'norm': the norm to CLIP_VALUE
    G.CLIP_VALUE = 1.0
    G.NORM_TYPE = 2.0  # the p of the p-norm for 'norm'
    # detectron2's SOLVER.IMS_PER_BATCH: the total images per step over all processes; 0 = off (Detectron:
    # NUM_GPUS x TRAIN.IMS_PER_BATCH). When set, training divides it by the run's device count (an error if it
    # does not divide) and sets NUM_GPUS / TRAIN.IMS_PER_BATCH from it, so the schedule is not rescaled.
    S.IMS_PER_BATCH = 0
    A = S.AMP = CfgNode()  # detectron2's key; --amp on train_net_step.py and test_net.py sets it
    A.ENABLED = False  # autocast float16 + GradScaler on CUDA, bfloat16 autocast on the CPU


def _fast_rcnn(C: CfgNode) -> None:
    F = C.FAST_RCNN = CfgNode()
    F.ROI_BOX_HEAD = ""  # e.g. 'fast_rcnn_heads.add_roi_2mlp_head'
    F.MLP_HEAD_DIM = 1024
    F.CONV_HEAD_DIM = 256
    F.NUM_STACKED_CONVS = 4
    F.ROI_XFORM_METHOD = "RoIPoolF"  # 'RoIPoolF' (= RoIPool) | 'RoIAlign'
    F.ROI_XFORM_SAMPLING_RATIO = 0
    F.ROI_XFORM_RESOLUTION = 14
    F.ROI_XFORM_ALIGNED = False  # pydetectron
    # pydetectron (detectron2's ROI_BOX_HEAD keys; defaults = Detectron's behaviour)
    F.NUM_FC = 2  # fcs of MLP_HEAD_DIM in FastRCNNConvFCHead (after NUM_STACKED_CONVS convs of CONV_HEAD_DIM)
    F.NORM = ""  # FastRCNNConvFCHead conv norm: '' | 'GN' | 'BN' | 'SyncBN' | 'FrozenBN' (d2's get_norm)
    F.SMOOTH_L1_BETA = 1.0  # box-regression smooth-L1 beta (Detectron 1.0; d2's default 0.0 = L1)
    F.BBOX_REG_LOSS_TYPE = "smooth_l1"  # 'smooth_l1' | 'giou' (giou: detectron2 mode only)
    F.BBOX_REG_LOSS_WEIGHT = 1.0  # multiplies the box-regression loss


def _rpn(C: CfgNode) -> None:
    R = C.RPN = CfgNode()
    R.RPN_ON = False  # inferred from MODEL.FASTER_RCNN / MODEL.RPN_ONLY
    R.SIZES = (64, 128, 256, 512)  # single-level RPN only; FPN uses FPN.RPN_*
    R.STRIDE = 16
    R.ASPECT_RATIOS = (0.5, 1, 2)
    # Detectron.pytorch additions
    R.OUT_DIM_AS_IN_DIM = True
    R.OUT_DIM = 512
    R.CLS_ACTIVATION = "sigmoid"
    # pydetectron: detectron2's RPN loss keys, read in both conventions unless said
    R.SMOOTH_L1_BETA = 1.0 / 9.0  # box-loss smooth-L1 beta (Detectron's 1/9; < 1e-5 = L1, detectron2's 0.0)
    R.LOSS_WEIGHT = 1.0  # multiplies both RPN losses
    R.BBOX_REG_LOSS_WEIGHT = 1.0  # multiplies the RPN box loss (on top of LOSS_WEIGHT)
    R.BBOX_REG_LOSS_TYPE = "smooth_l1"  # 'smooth_l1' | 'giou' (giou: detectron2 mode only)
    R.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # RPN box coder weights (others: detectron2 mode only)


def _fpn(C: CfgNode) -> None:
    F = C.FPN = CfgNode()
    F.FPN_ON = False
    F.DIM = 256
    F.ZERO_INIT_LATERAL = False
    F.COARSEST_STRIDE = 32  # inputs are padded to a multiple of this
    F.MULTILEVEL_ROIS = False
    F.ROI_CANONICAL_SCALE = 224
    F.ROI_CANONICAL_LEVEL = 4
    F.ROI_MAX_LEVEL = 5
    F.ROI_MIN_LEVEL = 2
    F.MULTILEVEL_RPN = False
    F.RPN_MAX_LEVEL = 6
    F.RPN_MIN_LEVEL = 2
    F.RPN_ASPECT_RATIOS = (0.5, 1, 2)
    F.RPN_ANCHOR_START_SIZE = 32  # doubles per level: 32..512 on P2..P6
    F.RPN_COLLECT_SCALE = 1  # Detectron.pytorch, set by the trainer
    F.EXTRA_CONV_LEVELS = False
    F.USE_GN = False
    # pydetectron (detectron2's FPN.NORM): norm of the lateral / output convs, which then lose their bias:
    # '' | 'GN' | 'BN' | 'SyncBN' | 'FrozenBN' (= AffineChannel). USE_GN True means 'GN'; both conventions.
    F.NORM = ""


def _mrcnn(C: CfgNode) -> None:
    M = C.MRCNN = CfgNode()
    M.ROI_MASK_HEAD = ""  # e.g. 'mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs'
    M.RESOLUTION = 14
    M.ROI_XFORM_METHOD = "RoIAlign"
    M.ROI_XFORM_RESOLUTION = 7
    M.ROI_XFORM_SAMPLING_RATIO = 0
    M.ROI_XFORM_ALIGNED = False  # pydetectron
    M.DIM_REDUCED = 256
    M.DILATION = 2
    M.UPSAMPLE_RATIO = 1
    M.USE_FC_OUTPUT = False
    M.CONV_INIT = "GaussianFill"  # 'GaussianFill' | 'MSRAFill'
    M.CLS_SPECIFIC_MASK = True
    M.WEIGHT_LOSS_MASK = 1.0
    M.THRESH_BINARIZE = 0.5
    M.MEMORY_EFFICIENT_LOSS = True  # Detectron.pytorch
    # pydetectron (detectron2's ROI_MASK_HEAD keys)
    M.NUM_CONV = 4  # MaskRCNNConvUpsampleHead: 3x3 convs of DIM_REDUCED before the deconv (0 on Res5ROIHeads)
    M.NORM = ""  # MaskRCNNConvUpsampleHead conv norm: '' | 'GN' | 'BN' | 'SyncBN' | 'FrozenBN'


def _krcnn(C: CfgNode) -> None:
    K = C.KRCNN = CfgNode()
    K.ROI_KEYPOINTS_HEAD = ""  # e.g. 'keypoint_rcnn_heads.add_roi_pose_head_v1convX'
    K.HEATMAP_SIZE = -1
    K.UP_SCALE = -1
    K.USE_DECONV = False
    K.DECONV_DIM = 256
    K.USE_DECONV_OUTPUT = False
    K.DILATION = 1
    K.DECONV_KERNEL = 4
    K.NUM_KEYPOINTS = -1
    K.NUM_STACKED_CONVS = 8
    K.CONV_HEAD_DIM = 256
    K.CONV_HEAD_KERNEL = 3
    K.CONV_INIT = "GaussianFill"
    K.NMS_OKS = False
    K.KEYPOINT_CONFIDENCE = "bbox"  # 'bbox' | 'logit' | 'prob'
    K.ROI_XFORM_METHOD = "RoIAlign"
    K.ROI_XFORM_RESOLUTION = 7
    K.ROI_XFORM_SAMPLING_RATIO = 0
    K.ROI_XFORM_ALIGNED = False  # pydetectron
    K.MIN_KEYPOINT_COUNT_FOR_VALID_MINIBATCH = 20
    K.INFERENCE_MIN_SIZE = 0
    K.LOSS_WEIGHT = 1.0
    K.NORMALIZE_BY_VISIBLE_KEYPOINTS = True
    K.OKS_SIGMAS = ()  # pydetectron; () = the 17 COCO person sigmas


def _backbone(C: CfgNode) -> None:
    C.RFCN = CfgNode()
    C.RFCN.PS_GRID_SIZE = 3

    R = C.RESNETS = CfgNode()
    R.NUM_GROUPS = 1  # > 1: ResNeXt
    R.WIDTH_PER_GROUP = 64
    R.STRIDE_1X1 = True  # MSRA style: stride in the 1x1 conv
    R.TRANS_FUNC = "bottleneck_transformation"
    R.STEM_FUNC = "basic_bn_stem"
    R.SHORTCUT_FUNC = "basic_bn_shortcut"
    R.RES5_DILATION = 1
    # Detectron.pytorch additions
    R.FREEZE_AT = 2
    R.IMAGENET_PRETRAINED_WEIGHTS = ""  # relative paths are taken from ROOT_DIR
    R.USE_GN = False
    # pydetectron
    R.NORM = "AffineChannel"  # | "GN" | "BN" | "SyncBN"; detectron2's "FrozenBN" is read as AffineChannel
    # MGD's student: the last block of each stage gets trainable GroupNorm(32) norms (MGD's d2 key name)
    R.ENABLE_STAGE_LAST_NORM = False

    G = C.GROUP_NORM = CfgNode()
    G.DIM_PER_GP = -1  # exactly one of DIM_PER_GP / NUM_GROUPS is -1
    G.NUM_GROUPS = 32
    G.EPSILON = 1e-5


def _misc(C: CfgNode) -> None:
    C.NUM_GPUS = 1
    C.USE_NCCL = False
    C.DEDUP_BOXES = 1 / 16.0
    C.BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)  # a plain float (Detectron's np.float64 broke YAML merges)
    C.PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])  # (1, 1, 3), BGR
    C.PIXEL_STDS = np.array([[[1.0, 1.0, 1.0]]])  # pydetectron
    C.RNG_SEED = 3
    C.EPS = 1e-14
    C.ROOT_DIR = _PROJECT_ROOT
    C.OUTPUT_DIR = "/tmp"
    C.MATLAB = "matlab"
    C.MEMONGER = True
    C.MEMONGER_SHARE_ACTIVATIONS = False
    C.VIS = False
    C.VIS_TH = 0.9
    C.EXPECTED_RESULTS = []
    C.EXPECTED_RESULTS_RTOL = 0.1
    C.EXPECTED_RESULTS_ATOL = 0.005
    C.EXPECTED_RESULTS_SIGMA_TOL = 4
    C.EXPECTED_RESULTS_EMAIL = ""
    # Weights named by URL are downloaded here (Detectron's directory name, under the user's cache folder)
    C.DOWNLOAD_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")),
                                    "detectron-download-cache")
    C.CLUSTER = CfgNode()
    C.CLUSTER.ON_CLUSTER = False
    # Detectron.pytorch additions
    C.DATA_DIR = os.path.join(_PROJECT_ROOT, "data")
    C.POOLING_MODE = "crop"
    C.POOLING_SIZE = 7
    C.CROP_RESIZE_WITH_MAX_POOL = True
    C.CUDA = False
    C.DEBUG = False
    C.PYTORCH_VERSION_LESS_THAN_040 = False


def _distill(C: CfgNode) -> None:
    """pydetectron: teacher/student distillation (``pydetectron.distill``), MGD's d2 values by default."""
    D = C.DISTILL = CfgNode()
    D.METHOD = ""  # '' = off | 'mgd' | 'feature_l2'
    D.TEACHER_CFG = ""  # the teacher detector's YAML
    D.TEACHER_WEIGHTS = ""  # the teacher's weights ('' = they come with the merged TRAIN.WEIGHTS)
    # Per stage C2, C3, C4, C5: each stage's summed loss is divided by its factor (MGD's det loss_factors)
    D.LOSS_FACTORS = (5e7, 5e7, 5e6, 5e6)
    D.IGNORE_INDS = ()  # stages left out, MGD's indices: 0 = C2 ... 3 = C5
    M = D.MGD = CfgNode()
    M.REDUCER = "amp"  # 'amp' | 'sp' | 'rd' | 'sm'
    M.UPDATE_FREQ = (5000, 31000)  # iterations between matchings, before / after UPDATE_SLOW_STEP
    M.UPDATE_SLOW_STEP = 20000
    M.UPDATE_ITER = 1000  # a matching reads UPDATE_ITER + 1 batches (MGD's loop)
    M.TEACHER_BN_WEIGHTS = ""  # torchvision .pth with the teacher's BN gamma/beta (an AffineChannel teacher)


def build_defaults() -> CfgNode:
    """A new default tree (unfrozen). ``get_cfg()`` is the public entry point."""
    C = CfgNode()
    for section in (_train, _data_loader, _test, _model, _retinanet, _solver, _fast_rcnn, _rpn, _fpn,
                    _mrcnn, _krcnn, _backbone, _misc, _distill):
        section(C)
    return C
