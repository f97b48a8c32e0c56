#!/usr/bin/env python3
"""R-50-FPN Mask R-CNN in detectron2 mode: inference and one training iteration, ours beside detectron2's own
(when it is importable) and beside torchvision's maskrcnn_resnet50_fpn (always), in one run
(../shared/BENCHMARKING.md; issue 15's target: ours at most 0.8 of detectron2's time).

    python tools/benchmark_detectron2.py [--threads 2] [--height 800 --width 1067] [--repeats 3] [--seed 0]

Same image (a generated photograph-like scene with 8 objects), same size, same threads. Weights: detectron2's
model of ``configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml`` with every tensor drawn from
``--seed``, its frozen norms calibrated on the image, saved by detectron2's DetectionCheckpointer and loaded by
ours, so both run the same network and keep the same 1000 proposals and 100 detections (score threshold 0; the
printed workload shows the counts). Without detectron2 ours is randomised and calibrated the same way itself.
torchvision's model is randomised and calibrated on the image too. Inference is one image in, detections with
pasted masks out (each side's own pre-processing and resize included: detectron2's DefaultPredictor,
``pydetectron.Predictor``, torchvision's transform). Training iterations run at learning rate 0 on a fixed batch
(the optimizer step still runs), so the work does not change as timing goes on.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pydetectron.config import assert_and_infer_cfg, load_detectron2_config
from pydetectron.config.merge import cfg_to_yaml
from pydetectron.data.minibatch import BlobSettings, input_size, prepare_test_image
from pydetectron.engine.predictor import Predictor
from pydetectron.modeling.detector import build_detector, total_loss
from pydetectron.utils.benchmark import TABLE_HEADER, compare, machine_description, model_benchmark_parser
from pydetectron.utils.detectron2_peer import (
    Detectron2Missing,
    calibrate_frozen_norms,
    d2_cfg,
    d2_inputs,
    random_d2_model,
    randomize_d2_model,
    require_detectron2,
    save_d2_checkpoint,
)
from pydetectron.weights import load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_model import NUM_OBJECTS, Workloads, _Calibrating  # noqa: E402  (torchvision's side, the scene)

CONFIG = Path(__file__).resolve().parents[1] / "configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


def _opts(height: int) -> list:
    """detectron2 options of the benchmark: the image's size in training and test, every detection kept."""
    return ["INPUT.MIN_SIZE_TEST", str(height), "INPUT.MAX_SIZE_TEST", "1333", "INPUT.MIN_SIZE_TRAIN",
            f"({height},)", "INPUT.MAX_SIZE_TRAIN", "1333", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def _polygons(masks: np.ndarray, scale_x: float, scale_y: float) -> list:
    import cv2

    out = []
    for mask in masks:
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polys = [c.reshape(-1, 2).astype(np.float64) * (scale_x, scale_y) for c in contours if len(c) >= 3]
        out.append([p.reshape(-1) for p in polys])
    return out


class Detectron2Side:
    """detectron2's model on the benchmark scene: DefaultPredictor inference, and its training iteration."""

    def __init__(self, height: int, image: np.ndarray, seed: int, folder: str):
        from detectron2.engine import DefaultPredictor

        self.cfg = d2_cfg(str(CONFIG), _opts(height))
        model = random_d2_model(self.cfg, seed)
        calibrate_frozen_norms(model, lambda: model.backbone(model.preprocess_image(d2_inputs([image])).tensor))
        self.weights = save_d2_checkpoint(model, folder, "benchmark_random")
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = self.weights
        self.predictor = DefaultPredictor(cfg)
        self.image = image

    def detect(self):
        return self.predictor(self.image)["instances"]

    def training_step(self, boxes: np.ndarray, labels: torch.Tensor, masks: np.ndarray, ims_per_batch: int):
        from detectron2.data import transforms as T
        from detectron2.structures import Boxes, Instances, PolygonMasks
        from detectron2.utils.events import EventStorage

        model = self.predictor.model
        resize = T.ResizeShortestEdge(self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST)
        resized = resize.get_transform(self.image).apply_image(self.image)
        sy, sx = resized.shape[0] / self.image.shape[0], resized.shape[1] / self.image.shape[1]
        instances = Instances(resized.shape[:2])
        instances.gt_boxes = Boxes(torch.from_numpy(boxes * np.array([sx, sy, sx, sy], np.float32)))
        instances.gt_classes = labels - 1  # detectron2 counts classes from 0, without the background
        instances.gt_masks = PolygonMasks(_polygons(masks, sx, sy))
        batch = [{"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))), "instances": instances}
                 for _ in range(ims_per_batch)]

        def losses():
            with EventStorage(0):  # detectron2's training forward logs into one
                return model(batch)
        return _sgd_step(model, losses)


class OurSide:
    """pydetectron's detectron2 mode: ``pydetectron.Predictor`` inference and the detector's training iteration."""

    def __init__(self, height: int, image: np.ndarray, seed: int, folder: str, weights: str | None):
        self.cfg = load_detectron2_config(str(CONFIG), _opts(height))  # Predictor prepares its own copy
        self.model_cfg = assert_and_infer_cfg(self.cfg.clone())
        if weights is None:  # no detectron2: our own d2-mode model, randomised and calibrated the same way
            weights = self._own_random_weights(image, seed, folder)
        self.predictor = Predictor(self.cfg, weights, device="cpu", print_fn=lambda _: None)
        self.weights = weights
        self.image = image

    def _own_random_weights(self, image: np.ndarray, seed: int, folder: str) -> str:
        model = build_detector(self.model_cfg).eval()
        randomize_d2_model(model, seed)
        settings = BlobSettings.from_cfg(self.model_cfg, train=False)
        blob, scale = prepare_test_image(image, settings)
        h, w = input_size(image.shape[0], image.shape[1], scale, settings)
        with _Calibrating(model), torch.no_grad():
            model(blob, torch.tensor([[h, w, scale]]))
        path = os.path.join(folder, "ours_random.pth")
        torch.save({"model": model.state_dict(), "cfg": cfg_to_yaml(self.model_cfg)}, path)
        return path

    def detect(self):
        return self.predictor(self.image)

    def training_step(self, boxes: np.ndarray, labels: torch.Tensor, masks: np.ndarray, ims_per_batch: int):
        model = build_detector(self.model_cfg)
        load_pretrained(model, self.weights, self.model_cfg, training=False, print_fn=lambda _: None)
        settings = BlobSettings.from_cfg(self.model_cfg, train=False)
        blob, scale = prepare_test_image(self.image, settings)
        h, w = input_size(self.image.shape[0], self.image.shape[1], scale, settings)
        sy, sx = h / self.image.shape[0], w / self.image.shape[1]
        roidb = [{"boxes": torch.from_numpy(boxes * np.array([sx, sy, sx, sy], np.float32)), "gt_classes": labels,
                  "is_crowd": torch.zeros(len(boxes), dtype=torch.bool), "segms": _polygons(masks, sx, sy),
                  "gt_keypoints": None, "image_id": 0, "flipped": False, "height": self.image.shape[0],
                  "width": self.image.shape[1]} for _ in range(ims_per_batch)]
        data = blob.expand(ims_per_batch, -1, -1, -1).contiguous()
        im_info = torch.tensor([[h, w, scale]]).expand(ims_per_batch, -1).contiguous()
        return _sgd_step(model, lambda: model(data, im_info, roidb))


def _sgd_step(model: torch.nn.Module, losses_fn):
    """A closure: forward, backward and an SGD step at learning rate 0 (a fixed workload)."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = losses_fn()
        total_loss({k: v for k, v in losses.items() if k.startswith("loss")}).backward()
        optimizer.step()
    return step


def _count(detections) -> int:
    return len(detections) if hasattr(detections, "pred_boxes") else len(detections["boxes"])


def main() -> None:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(machine_description(args.threads) + "; device cpu")
    torchvision_side = Workloads(args.height, args.width, device, args.ims_per_batch, models=("peer",))
    torchvision_side.calibrate()
    image, boxes, masks = torchvision_side.image, torchvision_side.boxes, torchvision_side.masks
    labels = torchvision_side.gt_labels()
    with tempfile.TemporaryDirectory() as folder:
        try:
            require_detectron2()
            d2 = Detectron2Side(args.height, image, args.seed, folder)
        except Detectron2Missing as err:
            print(f"detectron2 columns left out: {err}")
            d2 = None
        ours = OurSide(args.height, image, args.seed, folder, d2.weights if d2 else None)
        size = f"{args.height}x{args.width}"
        peers = [("torchvision", torchvision_side.peer_detect)] + ([("detectron2", d2.detect)] if d2 else [])
        print(f"\n{TABLE_HEADER}")
        for name, peer_detect in peers:
            workload = (f"{size}, detections ours {_count(ours.detect())} / {name} {_count(peer_detect())}")
            print(compare(f"inference / image vs {name}", workload, ours.detect, peer_detect, device,
                          repeats=args.repeats, warmup=1).row(), flush=True)
        ours_step = ours.training_step(boxes, labels, masks, args.ims_per_batch)
        _, torchvision_step = torchvision_side.training_steps()
        steps = [("torchvision", torchvision_step)]
        if d2:
            steps.append(("detectron2", d2.training_step(boxes, labels, masks, args.ims_per_batch)))
        for name, peer_step in steps:
            print(compare(f"training iteration (lr 0) vs {name}", f"{args.ims_per_batch} x {size}, {NUM_OBJECTS} gt "
                          "objects", ours_step, peer_step, device, repeats=args.repeats, warmup=1).row(), flush=True)


if __name__ == "__main__":
    main()
