"""Everything ``tools/test_net.py`` does, as a library: test a model on TEST.DATASETS and evaluate it.

Detectron's ``core/test_engine.py`` flow:
  * one process runs inference over the dataset, or over ``--range START END`` (roidb indices, END
    exclusive) and then only writes ``detections_range_START_END.pkl``;
  * with ``--multi-gpu-testing`` (or ``--num_workers N`` > 1) the dataset is cut into N contiguous ranges,
    the tool is launched once per range (child i sees GPU i, or a share of the CPU cores), and the parent
    merges the partial pickles;
  * the merged detections go to ``detections.pkl`` and are evaluated with pycocotools;
  * ``--eval_only <detections.pkl>`` evaluates a pickle written earlier, with no model at all.

Under torchrun (or ``--num-gpus``, ``engine/launch.py``) every rank infers its contiguous share of the images
(``distributed_inference``, also used by the evaluation during training), the detections are gathered on
rank 0, which alone writes ``detections.pkl`` and evaluates, once.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO

from pydetectron.config import assert_and_infer_cfg, cfg_to_yaml
from pydetectron.data.coco import CocoDataset
from pydetectron.data.minibatch import BlobSettings
from pydetectron.data.proposals import attach_proposals, write_proposal_file
from pydetectron.engine.console import ConsoleLog
from pydetectron.engine.dataset_cfg import apply_dataset_meta, check_num_classes, select_datasets
from pydetectron.engine.inference_model import build_inference_model
from pydetectron.engine.trainer import AmpSettings
from pydetectron.evaluation.bbox_aug import detection_function
from pydetectron.evaluation.coco_eval import copypaste_lines
from pydetectron.evaluation.inference import evaluate_detections, inference_on_dataset
from pydetectron.evaluation.proposal_eval import evaluate_rpn_detections
from pydetectron.utils.distributed import all_gather_object, get_rank, get_world_size, is_main_process
from pydetectron.vis import draw_detections, save_image
from pydetectron.weights.download import is_url

Print = Callable[[str], None]
DETECTIONS_FILE = "detections.pkl"
EVALUATION_FILE = "evaluation.json"  # {dataset: {task: {AP name: value}}}, what the copypaste lines print
RPN_PROPOSALS_FILE = "rpn_proposals.pkl"
_PKL_VERSION = 1


@dataclass
class TestOptions:
    """Detectron.pytorch's test_net.py flags (see ``tools/test_net.py --help``)."""

    __test__ = False  # not a pytest test class

    cfg_file: str | None = None
    set_cfgs: Sequence[str] = ()
    config_file: str | None = None  # a detectron2 YAML (--config-file) instead of cfg_file
    opts: Sequence[str] = ()  # its trailing detectron2 KEY VALUE overrides
    dataset: str | None = None
    register: Sequence[str] = ()
    load_ckpt: str | None = None
    load_detectron: str | None = None
    output_dir: str | None = None
    range: tuple[int, int] | None = None
    multi_gpu_testing: bool = False
    num_workers: int | None = None
    vis: bool = False
    eval_only: str | None = None
    use_cuda: bool = True
    amp: bool = False  # --amp: SOLVER.AMP.ENABLED (autocast inference)
    child_command: Sequence[str] = field(default_factory=list)  # how to launch this tool again (multi-process)


# ------------------------------------------------------------------------------------------------ setup
def default_output_dir(options: TestOptions) -> Path:
    """Beside the weights: a training checkpoint in ``<run>/ckpt`` tests into ``<run>/test`` (Detectron.pytorch's
    default), any other weights file into ``test`` in its own folder (never above it: a model-zoo ``.pkl``
    in the working directory must not write into its parent), ``./test`` for weights named by URL; beside the
    pickle for --eval_only."""
    if options.output_dir:
        return Path(options.output_dir)
    if options.eval_only:
        return Path(options.eval_only).resolve().parent
    weights = options.load_ckpt or options.load_detectron
    if not weights:
        raise ValueError("no --output_dir and no weights to put the results beside")
    if is_url(weights):  # a model-zoo URL: nothing local to put the results beside
        return Path("test")
    folder = Path(weights).resolve().parent
    return (folder.parent if folder.name == "ckpt" else folder) / "test"


def prepare_test_cfg(cfg, options: TestOptions, print_fn: Print = print) -> None:
    """--register, then --dataset (TEST.DATASETS, MODEL.NUM_CLASSES), class/keypoint counts from the dataset
    when the cfg leaves them open (a class count the dataset does not have is refused); then check, infer and
    freeze the cfg."""
    select_datasets(cfg, options.dataset, options.register, train=False)
    meta = open_dataset(cfg.TEST.DATASETS[0])[0].meta
    apply_dataset_meta(cfg, meta, print_fn)
    check_num_classes(cfg, meta, f"the test dataset {cfg.TEST.DATASETS[0]!r}")
    assert_and_infer_cfg(cfg)


def open_dataset(name: str, proposal_file: str | None = None, proposal_limit: int = -1
                 ) -> tuple[CocoDataset, list[dict]]:
    """A catalog dataset with its roidb read (which also fills its ``meta``), each entry with its precomputed
    proposals when `proposal_file` is given (the first `proposal_limit`, TEST.PROPOSAL_LIMIT)."""
    dataset = CocoDataset(name)
    roidb = dataset.get_roidb()
    if proposal_file:
        attach_proposals(roidb, proposal_file, limit=proposal_limit)
    return dataset, roidb


def proposal_file_of(cfg, index: int) -> str | None:
    """TEST.PROPOSAL_FILES[index] for a model that reads precomputed proposals (Detectron's
    ``get_inference_dataset``), else None."""
    if not cfg.TEST.PRECOMPUTED_PROPOSALS:
        return None
    files, datasets = tuple(cfg.TEST.PROPOSAL_FILES), tuple(cfg.TEST.DATASETS)
    if len(files) != len(datasets):
        raise ValueError(f"a model without RPN tests on precomputed proposals: TEST.PROPOSAL_FILES has {len(files)} "
                         f"files for TEST.DATASETS {datasets}; give one per dataset (--set TEST.PROPOSAL_FILES ...)")
    return str(files[index])


def inference_device(options: TestOptions) -> torch.device:
    """The GPU of this process (LOCAL_RANK under torchrun, else 0), or the CPU."""
    if options.use_cuda and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if get_world_size() > 1 else 0)
    return torch.device("cpu")


def rank_share(num_images: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous [start, end) of `num_images` (sizes differ by at most one; may be empty)."""
    bounds = np.linspace(0, num_images, world_size + 1).round().astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def distributed_inference(model: torch.nn.Module, entries: Sequence[Mapping], settings: BlobSettings,
                          device: torch.device, print_fn: Print = print, detect_fn=None,
                          amp: AmpSettings | None = None) -> dict[int, dict] | None:
    """Detections of every entry: each rank runs its share, rank 0 gets them all (the others get None).
    In one process it is plain inference. `amp` runs the model under autocast (boxes decoded in float32)."""
    start, end = rank_share(len(entries), get_world_size(), get_rank())
    with (amp or AmpSettings()).autocast():
        detections = inference_on_dataset(model, entries[start:end], settings, device, print_fn,
                                          **({"detect_fn": detect_fn} if detect_fn is not None else {}))
    parts = all_gather_object(detections)
    return merge_detections(parts) if is_main_process() else None


# ------------------------------------------------------------------------------------------- detections
def split_range(num_images: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) ranges covering 0..num_images, sizes differing by at most one
    (Detectron splits the same way); empty ranges are dropped."""
    if parts < 1:
        raise ValueError(f"cannot split a dataset into {parts} parts")
    bounds = np.linspace(0, num_images, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def check_range(index_range: Sequence[int], num_images: int) -> tuple[int, int]:
    start, end = (int(v) for v in index_range)
    if not 0 <= start < end <= num_images:
        raise ValueError(f"--range {start} {end} is not a non-empty part of 0..{num_images} "
                         f"(the dataset has {num_images} images; END is exclusive)")
    return start, end


def merge_detections(parts: Sequence[Mapping[int, dict]]) -> dict[int, dict]:
    """One {image id: detections} dict from partial ones; an image in two parts is an error."""
    merged: dict[int, dict] = {}
    for part in parts:
        twice = sorted(set(merged) & set(part))
        if twice:
            raise ValueError(f"image ids {twice[:10]} appear in more than one partial detections file")
        merged.update(part)
    return merged


def save_detections(path: str | Path, dataset_name: str, detections: Mapping[int, dict], cfg_yaml: str = "") -> None:
    """Write {image id: compact detections} with the dataset name (and the cfg) to a pickle, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"version": _PKL_VERSION, "dataset": dataset_name, "detections": dict(detections),
                     "cfg": cfg_yaml}, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)


def load_detections(path: str | Path) -> tuple[str, dict[int, dict]]:
    """(dataset name, {image id: detections}) from a pickle written by :func:`save_detections`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detections file {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable detections pickle ({err})") from err
    if not isinstance(data, dict) or data.get("version") != _PKL_VERSION or "detections" not in data:
        raise ValueError(f"{path}: not a pydetectron detections pickle (expected keys 'version' = "
                         f"{_PKL_VERSION}, 'dataset', 'detections')")
    return str(data["dataset"]), data["detections"]


def inference_amp(cfg, requested: bool = False) -> bool:
    """Whether inference runs under autocast: SOLVER.AMP.ENABLED (or --amp), except in detectron2 mode, where that
    key is training's only (detectron2 evaluates in float32) and only --amp (``requested``) turns it on."""
    if cfg.MODEL.CONVENTIONS == "detectron2":
        return bool(requested)
    return bool(cfg.SOLVER.AMP.ENABLED or requested)


def range_file(output_dir: Path, start: int, end: int) -> Path:
    return output_dir / f"detections_range_{start}_{end}.pkl"


# ------------------------------------------------------------------------------------------- evaluation
def evaluate_dataset(cfg, dataset_name: str, detections: Mapping[int, dict], output_dir: Path,
                     print_fn: Print = print) -> dict[str, dict[str, float]]:
    """COCO metrics of `detections` on catalog dataset `dataset_name` (every image must have an entry)."""
    dataset, _ = open_dataset(dataset_name)
    coco_gt = COCO(dataset.spec.ann_file)
    absent = sorted(set(coco_gt.getImgIds()) - set(detections))
    if absent:
        raise ValueError(f"detections cover {len(detections)} of {len(coco_gt.getImgIds())} images of "
                         f"{dataset_name}; missing image ids {absent[:10]}{' ...' if len(absent) > 10 else ''}")
    category_ids = [0] + [dataset.meta.contiguous_category_id_to_json_id[c] for c in range(1, dataset.meta.num_classes)]
    return evaluate_detections(coco_gt, detections, category_ids, dataset_name, output_dir,
                               cfg.KRCNN.OKS_SIGMAS or dataset.meta.oks_sigmas or None,
                               cfg.KRCNN.KEYPOINT_CONFIDENCE, print_fn, cfg.MODEL.CONVENTIONS == "detectron2")


def evaluate_rpn_proposals(cfg, dataset_name: str, detections: Mapping[int, dict], output_dir: Path,
                           print_fn: Print = print) -> dict[str, dict[str, float]]:
    """RPN-only models (Detectron's ``generate_rpn_on_dataset``): write ``rpn_proposals.pkl`` (the input of a
    Fast R-CNN model's TEST/TRAIN.PROPOSAL_FILES) and report the proposals' recall."""
    ids = sorted(detections)
    path = output_dir / RPN_PROPOSALS_FILE
    write_proposal_file(path, ids, [detections[i]["boxes"] for i in ids], [detections[i]["scores"] for i in ids],
                        cfg_to_yaml(cfg))
    print_fn(f"Wrote proposals to {path}")
    _, roidb = open_dataset(dataset_name)
    metrics = {"box_proposal": evaluate_rpn_detections(roidb, detections, dataset_name, print_fn)}
    for line in copypaste_lines(dataset_name, metrics):
        print_fn(line)
    return metrics


def evaluate_results(cfg, dataset_name: str, detections: Mapping[int, dict], output_dir: Path,
                     print_fn: Print = print) -> dict[str, dict[str, float]]:
    """Proposal recall for an RPN-only model, COCO metrics for every other; also written to EVALUATION_FILE
    in `output_dir`, so scripts (make demo's summary) read the figures rather than parse the log."""
    evaluate = evaluate_rpn_proposals if cfg.MODEL.RPN_ONLY else evaluate_dataset
    metrics = evaluate(cfg, dataset_name, detections, output_dir, print_fn)
    path = Path(output_dir) / EVALUATION_FILE
    path.write_text(json.dumps({dataset_name: metrics}, indent=2) + "\n")
    print_fn(f"Wrote the metrics to {path}")
    return metrics


# -------------------------------------------------------------------------------------------- inference
def decoded(detections: Mapping[str, object]) -> dict:
    """Compact detections (masks as RLE 'segms') -> the detector's layout with (D, H, W) 'masks'."""
    out = {k: v for k, v in detections.items() if k != "segms"}
    if detections.get("segms") is not None:
        out["masks"] = mask_util.decode(list(detections["segms"])).transpose(2, 0, 1) if detections["segms"] else None
    return out


def visualise(entries: Sequence[Mapping], detections: Mapping[int, dict], class_names: Sequence[str],
              skeleton: Sequence[Sequence[int]], thresh: float, out_dir: Path) -> None:
    """--vis: each image with its detections scoring >= `thresh` (cfg.VIS_TH) drawn, as out_dir/<name>.jpg."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        image = cv2.imread(entry["image"], cv2.IMREAD_COLOR)
        drawn = draw_detections(image, decoded(detections[int(entry["id"])]), class_names, thresh,
                                skeleton=skeleton or ())
        save_image(drawn, out_dir / f"{Path(entry['image']).stem}.jpg")


def run_inference(cfg, options: TestOptions, dataset: CocoDataset, entries: Sequence[Mapping], output_dir: Path,
                  print_fn: Print = print) -> dict[int, dict] | None:
    """Detections of this process's part of `dataset` (all of its roidb `entries`, or --range); in a
    distributed run each rank infers its share and rank 0 returns them all (the others None)."""
    start, end = check_range(options.range, len(entries)) if options.range else (0, len(entries))
    device = inference_device(options)
    model = build_inference_model(cfg, options.load_ckpt, options.load_detectron, device)
    world = get_world_size()
    print_fn(f"Testing on {dataset.name}: images {start}..{end - 1} of {len(entries)}, on {device}"
             + (f" and the devices of {world - 1} other processes" if world > 1 else ""))
    tic = time.perf_counter()
    # TEST.BBOX_AUG / BBOX_VOTE / MASK_AUG / KPS_AUG, else the model's own inference
    detect = detection_function(cfg, dataset.meta.keypoint_flip_permutation())
    detections = distributed_inference(model, entries[start:end], BlobSettings.from_cfg(cfg, train=False), device,
                                       print_fn, detect, AmpSettings(inference_amp(cfg, options.amp), device.type))
    if detections is None:
        return None
    elapsed = time.perf_counter() - tic
    print_fn(f"Inference: {end - start} images in {elapsed:.1f} s, {(end - start) / max(elapsed, 1e-9):.2f} images/s")
    if options.vis and cfg.MODEL.RPN_ONLY:
        print_fn("--vis: an RPN-only model has no classes to draw; no pictures")
    elif options.vis:
        visualise(entries[start:end], detections, dataset.meta.classes, dataset.meta.skeleton or (),
                  float(cfg.VIS_TH), output_dir / "vis")
        print_fn(f"Pictures in {output_dir / 'vis'}")
    return detections


def _child_env(index: int, workers: int) -> dict[str, str]:
    """Child `index` sees one GPU (round-robin over the visible ones) or an equal share of the CPU cores."""
    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if gpus > 0:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def child_arguments(options: TestOptions, dataset_name: str, num_classes: int, output_dir: Path, start: int,
                    end: int, proposal_file: str | None = None) -> list[str]:
    """The tool's flags for a child that tests images start..end-1 of `dataset_name` into `output_dir` with the
    parent's MODEL.NUM_CLASSES (which a --dataset short name may have set) and the dataset's proposal file."""
    args = list(options.child_command)
    if options.cfg_file:
        args += ["--cfg", str(options.cfg_file)]
    if options.config_file:
        args += ["--config-file", str(options.config_file)]
    for spec in options.register:
        args += ["--register", spec]
    args += ["--dataset", dataset_name, "--output_dir", str(output_dir), "--range", str(start), str(end)]
    if options.load_ckpt:
        args += ["--load_ckpt", str(options.load_ckpt)]
    if options.load_detectron:
        args += ["--load_detectron", str(options.load_detectron)]
    if not options.use_cuda:
        args.append("--no_cuda")
    if options.vis:
        args.append("--vis")
    if options.amp:
        args.append("--amp")
    args += ["--set", *options.set_cfgs, "MODEL.NUM_CLASSES", str(num_classes)]
    args += ["TEST.PROPOSAL_FILES", repr((proposal_file,))] if proposal_file else []
    return args + (["--", *options.opts] if options.opts else [])  # "--" ends --set: detectron2 opts follow


def run_in_parallel(cfg, options: TestOptions, dataset_name: str, num_images: int, workers: int, output_dir: Path,
                    proposal_file: str | None = None, print_fn: Print = print) -> dict[int, dict]:
    """Launch one child per range (logs in output_dir/test_range_S_E.log), wait, merge their pickles."""
    if not options.child_command:
        raise ValueError("multi-process testing needs TestOptions.child_command (how to launch the tool)")
    ranges = split_range(num_images, workers)
    output_dir.mkdir(parents=True, exist_ok=True)
    children = []
    for index, (start, end) in enumerate(ranges):
        log_path = output_dir / f"test_range_{start}_{end}.log"
        with open(log_path, "w") as log:
            args = child_arguments(options, dataset_name, cfg.MODEL.NUM_CLASSES, output_dir, start, end,
                                   proposal_file)
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_child_env(index, len(ranges)))
        children.append((process, start, end, log_path))
        print_fn(f"Launched process {process.pid} for images {start}..{end - 1}, log: {log_path}")
    failures = []
    for process, start, end, log_path in children:
        if process.wait() != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            failures.append(f"range {start} {end} exited with {process.returncode}; end of {log_path}:\n{tail}")
        else:
            print_fn(f"Images {start}..{end - 1} done")
    if failures:
        raise RuntimeError("test processes failed:\n" + "\n".join(failures))
    parts = []
    for _, start, end, _ in children:
        name, part = load_detections(range_file(output_dir, start, end))
        if name != dataset_name:
            raise ValueError(f"{range_file(output_dir, start, end)} holds {name}, expected {dataset_name}")
        parts.append(part)
    return merge_detections(parts)


def _workers(options: TestOptions) -> int:
    if options.num_workers is not None:
        if options.num_workers < 1:
            raise ValueError(f"--num_workers must be >= 1, got {options.num_workers}")
        return options.num_workers
    return max(torch.cuda.device_count(), 1) if options.multi_gpu_testing and options.use_cuda else 1


def run_on_dataset(cfg, options: TestOptions, dataset_name: str, output_dir: Path, proposal_file: str | None = None,
                   print_fn: Print = print) -> dict[str, dict[str, float]] | None:
    """Detect (in this process, one --range, or several processes), save, and evaluate one dataset.
    Returns the metrics, or None for a --range child (which only writes its partial pickle) and for the
    ranks other than 0 of a distributed run."""
    dataset, entries = open_dataset(dataset_name, proposal_file, int(cfg.TEST.PROPOSAL_LIMIT))
    workers = _workers(options)
    if options.range is not None:
        detections = run_inference(cfg, options, dataset, entries, output_dir, print_fn)
        path = range_file(output_dir, *check_range(options.range, len(entries)))
        save_detections(path, dataset_name, detections, cfg_to_yaml(cfg))
        print_fn(f"Wrote {path}")
        return None
    if workers > 1:
        tic = time.perf_counter()
        num_images = len(entries)
        detections = run_in_parallel(cfg, options, dataset_name, num_images, workers, output_dir, proposal_file,
                                     print_fn)
        elapsed = time.perf_counter() - tic
        print_fn(f"Inference with {workers} processes: {num_images} images in {elapsed:.1f} s, "
                 f"{num_images / max(elapsed, 1e-9):.2f} images/s (including start-up)")
    else:
        detections = run_inference(cfg, options, dataset, entries, output_dir, print_fn)
        if detections is None:  # a rank other than 0 of a distributed test: rank 0 saves and evaluates
            return None
    path = output_dir / DETECTIONS_FILE
    save_detections(path, dataset_name, detections, cfg_to_yaml(cfg))
    print_fn(f"Wrote detections to {path}")
    return evaluate_results(cfg, dataset_name, detections, output_dir, print_fn)


def run_test(cfg, options: TestOptions, print_fn: Print = print) -> dict[str, dict[str, dict[str, float]]]:
    """Prepare and freeze `cfg`, then test every TEST.DATASETS entry (or --eval_only a saved pickle).

    Results go to the output dir (one sub-folder per dataset when there are several). Returns
    {dataset: {task: {AP name: value}}} (empty for a --range child)."""
    if get_world_size() > 1 and (options.range or options.eval_only or _workers(options) > 1):
        raise ValueError("under torchrun / --num-gpus every process tests its share of the images: --range, "
                         "--eval_only, --multi-gpu-testing and --num_workers are for a single process")
    if options.amp:
        cfg.SOLVER.AMP.ENABLED = True
    saved = load_detections(options.eval_only) if options.eval_only else None
    if saved is not None and not options.dataset:
        cfg.TEST.DATASETS = (saved[0],)
    if not is_main_process():
        print_fn = _silent
    output_dir = default_output_dir(options)
    # the console also goes to <output_dir>/log.txt (rank 0; a --range child's parent keeps its log)
    with ConsoleLog(output_dir / "log.txt" if is_main_process() and options.range is None else None):
        return _test_datasets(cfg, options, saved, output_dir, print_fn)


def _test_datasets(cfg, options: TestOptions, saved, output_dir: Path, print_fn: Print):
    prepare_test_cfg(cfg, options, print_fn)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    if saved is not None:  # --eval_only: no model, evaluate the saved detections again
        name, detections = saved
        print_fn(f"Evaluating the detections of {len(detections)} images from {options.eval_only} on {name}")
        return {name: evaluate_results(cfg, name, detections, output_dir, print_fn)}
    print_fn(f"Results in {output_dir}")
    results = {}
    for index, name in enumerate(cfg.TEST.DATASETS):
        folder = output_dir / name if len(cfg.TEST.DATASETS) > 1 else output_dir
        metrics = run_on_dataset(cfg, options, name, folder, proposal_file_of(cfg, index), print_fn)
        if metrics is not None:
            results[name] = metrics
    return results


def _silent(_: str) -> None:
    """print_fn of the ranks other than 0."""
