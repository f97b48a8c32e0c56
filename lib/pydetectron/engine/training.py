"""Everything `tools/train_net_step.py` does, as a library: adapt the cfg, build data / model / solver, train.

The adaptation follows Detectron.pytorch's train_net_step.py: the config's schedule was written for
NUM_GPUS x TRAIN.IMS_PER_BATCH images per step; we scale BASE_LR with the batch size we run and STEPS /
MAX_ITER inversely with the effective batch size (x iter_size), then apply the command-line overrides. In a
distributed run every process is one device: the device count is the world size, and the total batch is
world size x TRAIN.IMS_PER_BATCH x iter_size.

Distributed (``engine/launch.py`` started the processes): the detector is wrapped in DistributedDataParallel
(one device per process); each rank reads its slice of every global batch (``data/samplers.py``); only rank 0
writes checkpoints, metrics.json, tensorboard, pictures and ``log.txt``; evaluation is shared by the ranks
(``engine/test_engine.py``).
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO

from pydetectron.config import assert_and_infer_cfg, cfg_to_yaml
from pydetectron.data.loader import build_train_loader_from_cfg
from pydetectron.data.minibatch import BlobSettings, split_per_device
from pydetectron.data.roidb import combined_roidb_from_cfg
from pydetectron.engine.checkpoint import CheckpointManager, load_checkpoint
from pydetectron.engine.console import ConsoleLog
from pydetectron.engine.dataset_cfg import apply_dataset_meta, select_datasets
from pydetectron.engine.distillation import Distillation, build_distillation, student_weights_part
from pydetectron.engine.hooks import PreciseBN, TrainerHook
from pydetectron.engine.logger import TrainingLogger, read_metrics
from pydetectron.engine.test_engine import distributed_inference, inference_amp, open_dataset, proposal_file_of
from pydetectron.engine.trainer import AmpSettings, Trainer, TrainLoopSettings
from pydetectron.evaluation.inference import evaluate_detections
from pydetectron.evaluation.proposal_eval import evaluate_rpn_detections
from pydetectron.modeling.detector import build_detector
from pydetectron.parallel import DataParallel, to_device
from pydetectron.solver import LRSchedule, build_gradient_clipper, build_optimizer, scale_schedule
from pydetectron.utils.distributed import broadcast_object, get_rank, get_world_size, is_main_process
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
    amp: bool = False
    hooks: Sequence[TrainerHook] = ()  # extra trainer hooks (distillation, EMA, ...), after the cfg's own


def training_device(options: TrainOptions) -> tuple[torch.device, int]:
    """(device of the master copy, number of devices this process feeds): one GPU per process in a
    distributed run (LOCAL_RANK), every visible GPU for the DataParallel otherwise, or the CPU."""
    cuda = options.use_cuda and torch.cuda.is_available()
    if get_world_size() > 1:
        return (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")), 1
    if cuda:
        return torch.device("cuda", 0), torch.cuda.device_count()
    return torch.device("cpu"), 1


def adapt_cfg(cfg, options: TrainOptions, num_devices: int, print_fn: Print = print) -> None:
    """Scale the schedule to the hardware and batch size, then apply the command-line solver overrides.
    `num_devices` counts every device of the run (world size x devices per process)."""
    split_total_batch(cfg, num_devices, print_fn)
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
    if options.amp:
        cfg.SOLVER.AMP.ENABLED = True


def split_total_batch(cfg, num_devices: int, print_fn: Print = print) -> None:
    """SOLVER.IMS_PER_BATCH (detectron2's total batch over all processes), when set, becomes NUM_GPUS = the run's
    device count and TRAIN.IMS_PER_BATCH = total / devices, so the schedule is the config's, unscaled."""
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total <= 0:
        return
    if total % num_devices:
        raise ValueError(f"SOLVER.IMS_PER_BATCH = {total} (the total batch over all processes) is not divisible by "
                         f"the {num_devices} devices of this run; choose a total that is a multiple of {num_devices}")
    cfg.NUM_GPUS = num_devices
    cfg.TRAIN.IMS_PER_BATCH = total // num_devices
    print_fn(f"SOLVER.IMS_PER_BATCH = {total} images per step in total: {cfg.TRAIN.IMS_PER_BATCH} on each of "
             f"{num_devices} devices")


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint a run wrote into ``<output_dir>/ckpt`` (None when there is none)."""
    return CheckpointManager(Path(output_dir) / "ckpt").latest()


def resolve_resume(options: TrainOptions, output_dir: Path, print_fn: Print = print) -> None:
    """detectron2's --resume: without --load_ckpt, continue from the output dir's last checkpoint, or (none yet)
    start afresh from the initial weights, as detectron2's ``resume_or_load`` does."""
    if not options.resume or options.load_ckpt:
        return
    latest = last_checkpoint(output_dir)
    if latest is None:
        print_fn(f"--resume: no checkpoint in {output_dir / 'ckpt'} yet; starting from the initial weights")
        options.resume = False
        return
    options.load_ckpt = str(latest)


def default_output_dir(cfg_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%b%d-%H-%M-%S")
    return Path("Outputs") / cfg_name / stamp


def load_weights(model: torch.nn.Module, cfg, options: TrainOptions, print_fn: Print = print,
                 output_dir: Path | None = None) -> dict | None:
    """--load_detectron / --load_ckpt (model only unless --resume), else TRAIN.WEIGHTS or the ImageNet backbone.
    A distillation's merged TRAIN.WEIGHTS gives the student its student part (``distillation.py``).

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
        part = student_weights_part(cfg) if origin == "TRAIN.WEIGHTS" else None
        print_fn(f"Initial weights from {origin}" + (f" (its {part} part)" if part else "") + ":")
        load_pretrained(model, cached_weights_path(path, cfg.DOWNLOAD_CACHE, origin), cfg, training=True,
                        output_dir=output_dir, print_fn=print_fn, part=part)
    return None



def _flatten(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{task}/{name}": value for task, figures in metrics.items() for name, value in figures.items()}


def make_evaluator(model, cfg, device, output_dir: Path, print_fn: Print):
    """evaluate(step) -> flat metrics on TEST.DATASETS[0] (on rank 0; None on the other ranks, which infer
    their share of the images), or None when no test dataset is set."""
    if not cfg.TEST.DATASETS:
        return None
    dataset, entries = open_dataset(cfg.TEST.DATASETS[0], proposal_file_of(cfg, 0), int(cfg.TEST.PROPOSAL_LIMIT))
    settings = BlobSettings.from_cfg(cfg, train=False)
    coco_gt = COCO(dataset.spec.ann_file) if is_main_process() else None
    category_ids = [0] + [dataset.meta.contiguous_category_id_to_json_id[c]
                          for c in range(1, dataset.meta.num_classes)]
    amp = AmpSettings(inference_amp(cfg), device.type)

    def evaluate(step: int) -> dict[str, float] | None:
        detections = distributed_inference(model, entries, settings, device, print_fn, amp=amp)
        if detections is None:
            return None
        if cfg.MODEL.RPN_ONLY:
            return _flatten({"box_proposal": evaluate_rpn_detections(entries, detections, dataset.name, print_fn)})
        metrics = evaluate_detections(coco_gt, detections, category_ids, dataset.name,
                                      output_dir / f"eval_step{step}", cfg.KRCNN.OKS_SIGMAS or None,
                                      cfg.KRCNN.KEYPOINT_CONFIDENCE, print_fn,
                                      cfg.MODEL.CONVENTIONS == "detectron2")
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


def wrap_for_training(model: torch.nn.Module, cfg, device: torch.device, num_devices: int):
    """(forward(batch) -> outputs, accumulate_context or None) for this process's model.

    Distributed: DistributedDataParallel over the process group, one device per process. Every parameter that
    requires a gradient receives one in each step of a generalized R-CNN or RetinaNet (a mask or keypoint head
    without foreground RoIs still runs on one RoI, as in Detectron), so unused-parameter search stays off; the
    exception is TRAIN.FREEZE_CONV_BODY, whose body outputs are detached (Detectron's StopGradient), so the
    body's parameters get no gradient and DDP must look for them (find_unused_parameters).
    One process: the custom DataParallel over this machine's GPUs (or the CPU)."""
    if get_world_size() > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None,  # inputs stay where they are: the roidb is read on the CPU
            find_unused_parameters=bool(cfg.TRAIN.FREEZE_CONV_BODY))

        def ddp_forward(batch: dict) -> dict:
            return ddp(data=to_device(batch["data"], device), im_info=to_device(batch["im_info"], device),
                       roidb=batch["roidb"])

        return ddp_forward, ddp.no_sync
    parallel = DataParallel(model, device_ids=list(range(num_devices)) if device.type == "cuda" else [])
    stride = BlobSettings.from_cfg(cfg, train=True).stride

    def forward(batch: dict) -> dict:
        parts = split_per_device(batch, num_devices, stride) if num_devices > 1 else [batch]
        return parallel(**{key: [part[key] for part in parts] for key in ("data", "im_info", "roidb")})

    return forward, None


def _seed_process(seed: int) -> None:
    """Every generator a rank draws from in training (RoI sampling, dropout) seeded from the seed and its rank."""
    rank_seed = seed + get_rank()
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)


def _loader_start(checkpoint: dict | None, start_step: int, options: TrainOptions, print_fn: Print) -> int:
    """Minibatches already consumed: the checkpoint's data position, else start_step x iter_size."""
    if checkpoint is None or "data" not in checkpoint:
        return start_step * options.iter_size
    data = checkpoint["data"]
    if int(data.get("num_replicas", 1)) != get_world_size():
        print_fn(f"The checkpoint's data stream was cut for {data['num_replicas']} processes, this run has "
                 f"{get_world_size()}: it continues at the same step with this run's global batches")
    return int(data["start_iter"])


def run_training(cfg, options: TrainOptions, print_fn: Print = print) -> Path:
    """Adapt and freeze `cfg`, train, and return the output directory (checkpoints, metrics, curves, log.txt).

    Runs in each process of a distributed run (``engine/launch.py``); only rank 0 prints and writes."""
    if not is_main_process():
        print_fn = _silent
    output_dir = Path(broadcast_object(str(options.output_dir or default_output_dir(options.cfg_name))))
    with ConsoleLog(output_dir / "log.txt" if is_main_process() else None):
        resolve_resume(options, output_dir, print_fn)
        device, local_devices = training_device(options)
        select_datasets(cfg, options.dataset, options.register, train=True)
        adapt_cfg(cfg, options, local_devices * get_world_size(), print_fn)
        check_proposal_files(cfg)
        roidb, meta = combined_roidb_from_cfg(cfg)
        apply_dataset_meta(cfg, meta, print_fn)
        assert_and_infer_cfg(cfg)
        return _train(cfg, options, roidb, output_dir, device, local_devices, print_fn)


def _silent(_: str) -> None:
    """print_fn of the ranks other than 0."""


def _train(cfg, options: TrainOptions, roidb, output_dir: Path, device: torch.device, local_devices: int,
           print_fn: Print) -> Path:
    main = is_main_process()
    if main:
        (output_dir / "config.yaml").write_text(cfg_to_yaml(cfg))
    world = get_world_size()
    print_fn(f"{len(roidb)} training entries from {', '.join(cfg.TRAIN.DATASETS)}; output in {output_dir}")
    if world > 1:
        print_fn(f"Distributed: {world} processes ({torch.distributed.get_backend()}), each on one "
                 f"{device.type.upper()} device, {cfg.TRAIN.IMS_PER_BATCH} images each per pass; total batch "
                 f"{world} x {cfg.TRAIN.IMS_PER_BATCH} x iter_size {options.iter_size} = "
                 f"{world * cfg.TRAIN.IMS_PER_BATCH * options.iter_size}")

    torch.manual_seed(cfg.RNG_SEED)  # the same initial weights on every rank
    model = build_detector(cfg).to(device)
    checkpoint = load_weights(model, cfg, options, print_fn, output_dir if main else None)
    distillation = _distillation(cfg, model, roidb, device, local_devices, print_fn, output_dir if main else None)
    optimizer = build_optimizer(model, cfg, extra={"distill": distillation.method} if distillation else None)
    schedule = LRSchedule.from_cfg(cfg)
    if world > 1:
        _seed_process(cfg.RNG_SEED)
    forward, accumulate = wrap_for_training(model, cfg, device, local_devices)
    batch_size = cfg.TRAIN.IMS_PER_BATCH * cfg.NUM_GPUS
    settings = TrainLoopSettings(
        max_iter=cfg.SOLVER.MAX_ITER, iter_size=options.iter_size, snapshot_iters=cfg.TRAIN.SNAPSHOT_ITERS,
        scale_momentum=cfg.SOLVER.SCALE_MOMENTUM, scale_momentum_threshold=cfg.SOLVER.SCALE_MOMENTUM_THRESHOLD,
        lr_in_momentum=cfg.SOLVER.LR_IN_MOMENTUM,
        log_lr_change_threshold=cfg.SOLVER.LOG_LR_CHANGE_THRESHOLD, eval_period=cfg.TEST.EVAL_PERIOD,
        save_checkpoints=not options.no_save, amp=AmpSettings(bool(cfg.SOLVER.AMP.ENABLED), device.type),
        clip_gradients=build_gradient_clipper(cfg),
        extra_state={"train_size": len(roidb), "batch_size": batch_size, "iter_size": options.iter_size,
                     "world_size": world, "cfg": cfg_to_yaml(cfg)},
    )
    logger = TrainingLogger(output_dir if main else None, cfg.SOLVER.MAX_ITER, options.disp_interval,
                            options.use_tfboard and main, print_fn)
    checkpoints = CheckpointManager(output_dir / "ckpt", options.keep_checkpoints) if main else None
    evaluate = make_evaluator(model, cfg, device, output_dir, print_fn)
    hooks = [distillation.hook] if distillation else []
    hooks += _cfg_hooks(cfg, model, roidb, device, evaluate, print_fn) + list(options.hooks)
    trainer = Trainer(model, optimizer, schedule, None, forward, settings, logger, checkpoints, evaluate,
                      print_fn, hooks, accumulate)
    start_step = options.start_step
    if checkpoint is not None:
        start_step = trainer.restore(checkpoint)
        print_fn(f"Resuming from {options.load_ckpt} at step {start_step}")
    trainer.batches = build_train_loader_from_cfg(
        cfg, roidb, start_iter=_loader_start(checkpoint, start_step, options, print_fn),
        devices_per_process=local_devices, num_replicas=world, rank=get_rank())
    try:
        trainer.train(start_step)
    finally:
        logger.close()
        if main and logger.metrics_path and logger.metrics_path.exists():
            draw_training_curves(read_metrics(logger.metrics_path), output_dir / "training_curves.png")
    print_fn(f"Training curves: {output_dir / 'training_curves.png'}")
    return output_dir


def _distillation(cfg, model, roidb, device: torch.device, local_devices: int, print_fn: Print,
                  output_dir: Path | None) -> Distillation | None:
    """DISTILL.METHOD: the teacher, the method and its hook (``engine/distillation.py``); None when off. The
    matching's batches come from a second loader seeded by the step, so the training stream is untouched."""
    if not cfg.DISTILL.METHOD:
        return None
    if local_devices > 1:
        raise ValueError(f"DISTILL.METHOD = {cfg.DISTILL.METHOD!r} with the single-process DataParallel over "
                         f"{local_devices} GPUs is not supported (the student's features would come from every "
                         "replica at once): run one process per GPU, tools/train_net_step.py --num-gpus N")

    def tracking_batches(step: int):
        return iter(build_train_loader_from_cfg(cfg, roidb, devices_per_process=1, num_replicas=get_world_size(),
                                                rank=get_rank(), seed=int(cfg.RNG_SEED) + 1 + step))

    return build_distillation(cfg, model, device, tracking_batches, print_fn, output_dir)


def _cfg_hooks(cfg, model, roidb, device: torch.device, evaluate, print_fn: Print) -> list[TrainerHook]:
    """The hooks the cfg asks for: TEST.PRECISE_BN before each evaluation."""
    if not (cfg.TEST.PRECISE_BN.ENABLED and evaluate):
        return []

    def fresh_batches(step: int):
        return iter(build_train_loader_from_cfg(cfg, roidb, devices_per_process=1, num_replicas=get_world_size(),
                                                rank=get_rank(), seed=int(cfg.RNG_SEED) + 1 + step))

    def run(batch: dict):
        return model(to_device(batch["data"], device), to_device(batch["im_info"], device), batch["roidb"])

    return [PreciseBN(model, fresh_batches, run, int(cfg.TEST.PRECISE_BN.NUM_ITER), print_fn)]
