"""Everything `tools/train_net_step.py` does, as a library: adapt the cfg, build data / model / solver, train.

The adaptation follows Detectron.pytorch's train_net_step.py: the config's schedule was written for
NUM_GPUS x TRAIN.IMS_PER_BATCH images per step; we scale BASE_LR with the batch size we run and STEPS /
MAX_ITER inversely with the effective batch size (x iter_size), then apply the command-line overrides.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from pycocotools.coco import COCO

from pydetectron.config import assert_and_infer_cfg, cfg_to_yaml
from pydetectron.data.loader import build_train_loader_from_cfg
from pydetectron.data.minibatch import BlobSettings, split_per_device
from pydetectron.data.roidb import combined_roidb_from_cfg
from pydetectron.engine.checkpoint import CheckpointManager, load_checkpoint
from pydetectron.engine.dataset_cfg import apply_dataset_meta, select_datasets
from pydetectron.engine.logger import TrainingLogger, read_metrics
from pydetectron.engine.trainer import Trainer, TrainLoopSettings
from pydetectron.evaluation.inference import evaluate_detections, inference_on_dataset
from pydetectron.evaluation.proposal_eval import evaluate_rpn_detections
from pydetectron.evaluation.test_engine import open_dataset, proposal_file_of
from pydetectron.modeling.detector import build_detector
from pydetectron.parallel import DataParallel
from pydetectron.solver import LRSchedule, build_optimizer, scale_schedule
from pydetectron.vis import draw_training_curves
from pydetectron.weights import load_pretrained
from pydetectron.weights.download import cached_weights_path

Print = Callable[[str], None]


@dataclass
class TrainOptions:
    """Detectron.pytorch's train_net_step.py flags (see `tools/train_net_step.py --help`)."""

    dataset: str | None = None
    register: Sequence[str] = ()
    batch_size: int | None = None
    num_workers: int | None = None
    iter_size: int = 1
    optimizer: str | None = None
    lr: float | None = None
    lr_decay_gamma: float | None = None
    start_step: int = 0
    load_ckpt: str | None = None
    load_detectron: str | None = None
    resume: bool = False
    no_save: bool = False
    use_tfboard: bool = False
    disp_interval: int = 20
    use_cuda: bool = True
    output_dir: str | None = None
    seed: int | None = None
    cfg_name: str = "model"
    keep_checkpoints: int = 3


def training_device(options: TrainOptions) -> tuple[torch.device, int]:
    """(device of the master copy, number of devices)."""
    if options.use_cuda and torch.cuda.is_available():
        return torch.device("cuda", 0), torch.cuda.device_count()
    return torch.device("cpu"), 1


def adapt_cfg(cfg, options: TrainOptions, num_devices: int, print_fn: Print = print) -> None:
    """Scale the schedule to the hardware and batch size, then apply the command-line solver overrides."""
    original_ims_per_batch = cfg.TRAIN.IMS_PER_BATCH
    scaled = scale_schedule(
        cfg.SOLVER.BASE_LR, cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER, cfg.NUM_GPUS, cfg.TRAIN.IMS_PER_BATCH,
        num_gpus=num_devices, batch_size=options.batch_size, iter_size=options.iter_size,
    )
    print_fn(scaled.summary)
    cfg.NUM_GPUS = scaled.num_gpus
    cfg.TRAIN.IMS_PER_BATCH = scaled.ims_per_batch
    cfg.SOLVER.BASE_LR = scaled.base_lr
    cfg.SOLVER.STEPS = scaled.steps
    cfg.SOLVER.MAX_ITER = scaled.max_iter
    if cfg.FPN.FPN_ON and cfg.MODEL.FASTER_RCNN:
        cfg.FPN.RPN_COLLECT_SCALE = cfg.TRAIN.IMS_PER_BATCH / original_ims_per_batch
        print_fn(f"FPN.RPN_COLLECT_SCALE (proposals collected per batch) scaled with IMS_PER_BATCH: "
                 f"{cfg.FPN.RPN_COLLECT_SCALE}")
    if options.num_workers is not None:
        cfg.DATA_LOADER.NUM_THREADS = options.num_workers
    if options.optimizer is not None:
        cfg.SOLVER.TYPE = options.optimizer
    if options.lr is not None:
        cfg.SOLVER.BASE_LR = options.lr
    if options.lr_decay_gamma is not None:
        cfg.SOLVER.GAMMA = options.lr_decay_gamma
    if options.seed is not None:
        cfg.RNG_SEED = options.seed


def default_output_dir(cfg_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%b%d-%H-%M-%S")
    return Path("Outputs") / cfg_name / stamp


def load_weights(model: torch.nn.Module, cfg, options: TrainOptions, print_fn: Print = print,
                 output_dir: Path | None = None) -> dict | None:
    """--load_detectron / --load_ckpt (model only unless --resume), else TRAIN.WEIGHTS or the ImageNet backbone.

    Every file goes through `weights.load_pretrained` (any format, the report printed and written to
    `output_dir`). Returns the checkpoint when resuming.
    """
    if options.load_ckpt and options.resume:
        return load_checkpoint(cached_weights_path(options.load_ckpt, cfg.DOWNLOAD_CACHE, "--load_ckpt"))
    sources = [(options.load_detectron, "--load_detectron"), (options.load_ckpt, "--load_ckpt")]
    sources = [(path, flag) for path, flag in sources if path]
    if not sources and cfg.TRAIN.WEIGHTS:  # Detectron's way of naming the initial weights
        sources = [(cfg.TRAIN.WEIGHTS, "TRAIN.WEIGHTS")]
    elif not sources and cfg.MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS:
        if not cfg.RESNETS.IMAGENET_PRETRAINED_WEIGHTS:
            raise ValueError("MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS is True but RESNETS.IMAGENET_PRETRAINED_WEIGHTS "
                             "is empty: name the weights file, or set the first key False to train from scratch")
        sources = [(cfg.RESNETS.IMAGENET_PRETRAINED_WEIGHTS, "RESNETS.IMAGENET_PRETRAINED_WEIGHTS")]
    for path, origin in sources:
        print_fn(f"Initial weights from {origin}:")
        load_pretrained(model, cached_weights_path(path, cfg.DOWNLOAD_CACHE, origin), cfg, training=True,
                        output_dir=output_dir, print_fn=print_fn)
    return None



def _flatten(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{task}/{name}": value for task, figures in metrics.items() for name, value in figures.items()}


def make_evaluator(model, cfg, device, output_dir: Path, print_fn: Print):
    """evaluate(step) -> flat metrics on TEST.DATASETS[0], or None when no test dataset is set."""
    if not cfg.TEST.DATASETS:
        return None
    dataset, entries = open_dataset(cfg.TEST.DATASETS[0], proposal_file_of(cfg, 0), int(cfg.TEST.PROPOSAL_LIMIT))
    settings = BlobSettings.from_cfg(cfg, train=False)
    coco_gt = COCO(dataset.spec.ann_file)
    category_ids = [0] + [dataset.meta.contiguous_category_id_to_json_id[c]
                          for c in range(1, dataset.meta.num_classes)]

    def evaluate(step: int) -> dict[str, float]:
        detections = inference_on_dataset(model, entries, settings, device, print_fn)
        if cfg.MODEL.RPN_ONLY:
            return _flatten({"box_proposal": evaluate_rpn_detections(entries, detections, dataset.name, print_fn)})
        metrics = evaluate_detections(coco_gt, detections, category_ids, dataset.name,
                                      output_dir / f"eval_step{step}", cfg.KRCNN.OKS_SIGMAS or None,
                                      cfg.KRCNN.KEYPOINT_CONFIDENCE, print_fn)
        return _flatten(metrics)

    return evaluate


def check_proposal_files(cfg) -> None:
    """A model without RPN (Fast R-CNN) learns and is evaluated on precomputed proposals: say so before
    loading anything."""
    if cfg.MODEL.FASTER_RCNN or cfg.MODEL.RPN_ONLY or cfg.RPN.RPN_ON or cfg.RETINANET.RETINANET_ON:
        return
    for split in ("TRAIN", "TEST"):
        files, datasets = tuple(cfg[split].PROPOSAL_FILES), tuple(cfg[split].DATASETS)
        if datasets and len(files) != len(datasets):
            raise ValueError(
                f"the model has no RPN (MODEL.FASTER_RCNN and MODEL.RPN_ONLY are off), so it trains and is evaluated "
                f"on precomputed proposals: {split}.PROPOSAL_FILES has {len(files)} files for {split}.DATASETS "
                f"{datasets}; give one Detectron proposal pickle per dataset (e.g. the rpn_proposals.pkl "
                "test_net.py writes for an RPN-only model)")


def run_training(cfg, options: TrainOptions, print_fn: Print = print) -> Path:
    """Adapt and freeze `cfg`, train, and return the output directory (checkpoints, metrics, curves)."""
    device, num_devices = training_device(options)
    select_datasets(cfg, options.dataset, options.register, train=True)
    adapt_cfg(cfg, options, num_devices, print_fn)
    check_proposal_files(cfg)
    roidb, meta = combined_roidb_from_cfg(cfg)
    apply_dataset_meta(cfg, meta, print_fn)
    assert_and_infer_cfg(cfg)
    output_dir = Path(options.output_dir) if options.output_dir else default_output_dir(options.cfg_name)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(cfg_to_yaml(cfg))
    print_fn(f"{len(roidb)} training entries from {', '.join(cfg.TRAIN.DATASETS)}; output in {output_dir}")

    torch.manual_seed(cfg.RNG_SEED)
    model = build_detector(cfg).to(device)
    checkpoint = load_weights(model, cfg, options, print_fn, output_dir)
    optimizer = build_optimizer(model, cfg)
    schedule = LRSchedule.from_cfg(cfg)
    batch_size = cfg.TRAIN.IMS_PER_BATCH * cfg.NUM_GPUS
    settings = TrainLoopSettings(
        max_iter=cfg.SOLVER.MAX_ITER, iter_size=options.iter_size, snapshot_iters=cfg.TRAIN.SNAPSHOT_ITERS,
        scale_momentum=cfg.SOLVER.SCALE_MOMENTUM, scale_momentum_threshold=cfg.SOLVER.SCALE_MOMENTUM_THRESHOLD,
        log_lr_change_threshold=cfg.SOLVER.LOG_LR_CHANGE_THRESHOLD, eval_period=cfg.TEST.EVAL_PERIOD,
        extra_state={"train_size": len(roidb), "batch_size": batch_size, "iter_size": options.iter_size,
                     "cfg": cfg_to_yaml(cfg)},
    )
    logger = TrainingLogger(output_dir, cfg.SOLVER.MAX_ITER, options.disp_interval, options.use_tfboard, print_fn)
    checkpoints = None if options.no_save else CheckpointManager(output_dir / "ckpt", options.keep_checkpoints)
    parallel = DataParallel(model, device_ids=list(range(num_devices)) if device.type == "cuda" else [])
    stride = BlobSettings.from_cfg(cfg, train=True).stride

    def forward(_, batch: dict) -> dict:
        parts = split_per_device(batch, num_devices, stride) if num_devices > 1 else [batch]
        return parallel(**{key: [part[key] for part in parts] for key in ("data", "im_info", "roidb")})

    start_step = int(checkpoint["step"]) if checkpoint is not None else options.start_step
    batches = build_train_loader_from_cfg(cfg, roidb, start_iter=start_step * options.iter_size)
    trainer = Trainer(model, optimizer, schedule, batches, forward, settings, logger, checkpoints,
                      make_evaluator(model, cfg, device, output_dir, print_fn), print_fn)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        print_fn(f"Resuming from {options.load_ckpt} at step {start_step}")
    try:
        trainer.train(start_step)
    finally:
        logger.close()
        if logger.metrics_path and logger.metrics_path.exists():
            draw_training_curves(read_metrics(logger.metrics_path), output_dir / "training_curves.png")
    print_fn(f"Training curves: {output_dir / 'training_curves.png'}")
    return output_dir
