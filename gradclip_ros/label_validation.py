"""Check label boxes one by one before they reach the training buffer.

ROS-free: the online-learning node turns a vision_msgs/Detection2DArray into
``(class_name, center_x, center_y, size_x, size_y)`` tuples in pixels and hands them here
with the size of the paired image. Each bad box is dropped and counted by kind; the other
boxes of the frame are kept. A frame left with no box is a valid "no objects here" frame.

Rules, checked in this order (a box counts once, under the first rule it breaks):

- ``non_finite``: a coordinate or size is NaN or Inf.
- ``unknown_class``: the class name is not in the detector's class list (or missing).
- ``non_positive_size``: width or height is zero or negative.
- ``outside_image``: the part of the box inside the image is narrower or lower than
  ``max(1, tolerance_px)`` pixels. A box only partly outside is clipped to the image and
  kept, since labels drawn up to the image border often overshoot it by a pixel or more.
"""

import collections
import math
from typing import Counter, Iterable, Optional, Sequence, Tuple

import numpy as np

BAD_LABEL_KINDS = ('non_finite', 'unknown_class', 'non_positive_size', 'outside_image')

# One labelled box as carried by vision_msgs: class name, center x/y and size in pixels.
RawBox = Tuple[Optional[str], float, float, float, float]


def validate_boxes(raw_boxes: Iterable[RawBox], class_names: Sequence[str], width: int,
                   height: int, tolerance_px: float = 1.0
                   ) -> Tuple[np.ndarray, np.ndarray, Counter]:
    """Convert center/size boxes to xyxy, dropping bad ones.

    Returns ``boxes`` float32 [N, 4] xyxy pixels clipped to the image, ``labels`` int64 [N]
    0-based into ``class_names``, and a Counter of dropped boxes by kind (keys from
    ``BAD_LABEL_KINDS``).
    """
    index_of = {name: index for index, name in enumerate(class_names)}
    boxes, labels = [], []
    dropped = collections.Counter()
    for class_name, center_x, center_y, size_x, size_y in raw_boxes:
        numbers = (center_x, center_y, size_x, size_y)
        if not all(math.isfinite(float(value)) for value in numbers):
            dropped['non_finite'] += 1
            continue
        if class_name not in index_of:
            dropped['unknown_class'] += 1
            continue
        if size_x <= 0.0 or size_y <= 0.0:
            dropped['non_positive_size'] += 1
            continue

        x1, x2 = center_x - size_x / 2.0, center_x + size_x / 2.0
        y1, y2 = center_y - size_y / 2.0, center_y + size_y / 2.0
        x1, y1 = max(x1, 0.0), max(y1, 0.0)
        x2, y2 = min(x2, float(width)), min(y2, float(height))
        # A sliver of up to tolerance_px inside the image is rounding, not an object.
        if x2 - x1 < max(1.0, tolerance_px) or y2 - y1 < max(1.0, tolerance_px):
            dropped['outside_image'] += 1
            continue
        boxes.append((x1, y1, x2, y2))
        labels.append(index_of[class_name])

    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
            dropped)
