"""Detection accuracy (COCO mAP) through torchmetrics with the faster-coco-eval backend."""

from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from gradclip_ros.model import Detections

# A ground-truth set for one image: boxes float32 [N, 4] xyxy pixels, labels int64 [N] 0-based.
Target = Tuple[np.ndarray, np.ndarray]


def mean_average_precision(predictions: Sequence[Detections], targets: Sequence[Target],
                           class_names: Sequence[str]) -> Dict[str, object]:
    """Return mAP@0.5, mAP@[.5:.95] and per-class AP (@[.5:.95]) over a set of images.

    Classes that have no ground truth in ``targets`` get no per-class entry, since COCO AP is
    undefined for them. With no ground-truth box at all, both mAPs are 0.0.
    """
    if len(predictions) != len(targets):
        raise ValueError(
            f'{len(predictions)} predictions but {len(targets)} targets; one each per image')
    # sync_on_compute=False: under torch.distributed, torchmetrics would otherwise gather
    # every rank's images and hang when only one rank computes (as in DDP validation).
    metric = MeanAveragePrecision(
        box_format='xyxy', iou_type='bbox', class_metrics=True, backend='faster_coco_eval',
        sync_on_compute=False)
    preds, gts = [], []
    for detections, (boxes, labels) in zip(predictions, targets):
        preds.append({
            'boxes': torch.as_tensor(detections.boxes, dtype=torch.float32).reshape(-1, 4),
            'scores': torch.as_tensor(detections.scores, dtype=torch.float32).reshape(-1),
            'labels': torch.as_tensor(detections.labels, dtype=torch.int64).reshape(-1),
        })
        gts.append({
            'boxes': torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            'labels': torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
        })
    if sum(len(t['labels']) for t in gts) == 0:
        return {'map50': 0.0, 'map': 0.0, 'per_class': {}, 'images': len(gts)}
    metric.update(preds, gts)
    result = metric.compute()

    per_class = {}
    classes = result['classes'].reshape(-1).tolist()
    values = result['map_per_class'].reshape(-1).tolist()
    for index, value in zip(classes, values):
        if value >= 0 and 0 <= index < len(class_names):  # -1 marks "no ground truth"
            per_class[class_names[index]] = float(value)
    return {
        'map50': max(0.0, float(result['map_50'])),
        'map': max(0.0, float(result['map'])),
        'per_class': per_class,
        'images': len(gts),
    }
