"""Inference over a dataset and its evaluation, shared by tools/test_net.py and periodic training eval.

Detections are kept compact as soon as an image is done (numpy arrays, masks as COCO RLE, as Detectron's
detections.pkl keeps them): full-image masks of a COCO-sized run would not fit in memory.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO

from pydetectron.data.minibatch import BlobSettings, input_size, load_image, prepare_test_image
from pydetectron.evaluation.coco_eval import copypaste_lines, evaluate_coco
from pydetectron.evaluation.coco_results import encode_mask, image_results

RESULT_FILE_PREFIX = {"bbox": "bbox", "segm": "segmentations", "keypoints": "keypoints"}


def detect_image(model: torch.nn.Module, image: np.ndarray, settings: BlobSettings, device: torch.device,
                 proposals: np.ndarray | None = None) -> dict:
    """Detections of one BGR uint8 image (original pixel coordinates), as the detector returns them, on CPU.
    A model without RPN detects in `proposals` ``(P, 4)`` (original pixels, TEST.PROPOSAL_FILES).

    The original size goes to the detector explicitly: recovering it from the scaled size can be one pixel off.
    """
    blob, im_scale = prepare_test_image(image, settings)
    height, width = input_size(image.shape[0], image.shape[1], im_scale, settings)
    im_info = torch.tensor([[height, width, im_scale]], dtype=torch.float32)
    entry: dict = {"height": image.shape[0], "width": image.shape[1]}
    if proposals is not None:
        entry["proposals"] = torch.as_tensor(proposals, dtype=torch.float32).reshape(-1, 4) * im_scale
    with torch.no_grad():
        result = model(blob.to(device), im_info.to(device), [entry])[0]
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


def compact(detections: Mapping[str, object]) -> dict:
    """numpy arrays, and masks as a list of RLEs under 'segms' (Detectron's detections.pkl layout)."""
    out = {}
    for key, value in detections.items():
        array = value.numpy() if isinstance(value, torch.Tensor) else value
        if key == "masks" and array is not None:
            out["segms"] = [encode_mask(m) for m in array]
        else:
            out[key] = array
    return out


def inference_on_dataset(
    model: torch.nn.Module,
    entries: Sequence[Mapping],
    settings: BlobSettings,
    device: torch.device,
    print_fn: Callable[[str], None] = print,
    progress_every: int = 20,
    detect_fn: Callable[[torch.nn.Module, np.ndarray, BlobSettings, torch.device], dict] = detect_image,
) -> dict[int, dict]:
    """{image id: compact detections} for each roidb entry (needs 'id' and 'image'), with a progress line.

    `detect_fn` runs one image (default: the model's own inference; test-time augmentation passes its own);
    entries with precomputed ``proposals`` hand them to it.
    """
    model.eval()
    results: dict[int, dict] = {}
    start = time.perf_counter()
    for done, entry in enumerate(entries, start=1):
        try:
            image = load_image(entry["image"], settings)  # cv2, or PIL + EXIF in detectron2 mode
        except OSError as err:
            raise FileNotFoundError(f"image {entry['image']!r} (image id {entry['id']}) is missing or unreadable: "
                                    f"{err}") from None
        extra = {"proposals": entry["proposals"]} if entry.get("proposals") is not None else {}
        results[int(entry["id"])] = compact(detect_fn(model, image, settings, device, **extra))
        if done % progress_every == 0 or done == len(entries):
            elapsed = time.perf_counter() - start
            rate = done / max(elapsed, 1e-9)
            eta = datetime.timedelta(seconds=int((len(entries) - done) / rate))
            print_fn(f"[inference] {done}/{len(entries)} images, {rate:.2f} img/s, eta {eta}")
    return results


def evaluate_detections(
    coco_gt: COCO,
    detections: Mapping[int, Mapping],
    category_ids: Sequence[int],
    dataset_name: str,
    output_dir: str | Path | None = None,
    oks_sigmas: Sequence[float] | None = None,
    keypoint_confidence: str = "bbox",
    print_fn: Callable[[str], None] = print,
    detectron2: bool = False,
) -> dict[str, dict[str, float]]:
    """COCO metrics for every task the detections carry; writes Detectron-named result jsons to output_dir.

    `category_ids[c]` is the json category id of contiguous class c. Returns {iou_type: {AP name: value}}.
    `detectron2`: results written with detectron2's conventions (``coco_results.image_results``).
    """
    per_task: dict[str, list] = {}
    for image_id in sorted(detections):
        for task, entries in image_results(image_id, detections[image_id], category_ids,
                                           keypoint_confidence, detectron2).items():
            per_task.setdefault(task, []).extend(entries)
    if not per_task:
        per_task["bbox"] = []
    metrics = {}
    for task, entries in per_task.items():
        if output_dir is not None:
            path = Path(output_dir) / f"{RESULT_FILE_PREFIX[task]}_{dataset_name}_results.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(entries))
            print_fn(f"Wrote {len(entries)} {task} results to {path}")
        sigmas = np.asarray(oks_sigmas, dtype=np.float64) if task == "keypoints" and oks_sigmas else None
        print_fn(f"Evaluating {task} on {dataset_name}")
        metrics[task] = evaluate_coco(coco_gt, entries, task, oks_sigmas=sigmas, print_fn=print_fn)
    for line in copypaste_lines(dataset_name, metrics):
        print_fn(line)
    return metrics
