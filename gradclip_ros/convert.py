"""``gradclip-ros convert``: turn videos or image folders (with COCO or KITTI labels) into a bag.

Each input is one camera: a video file (anything OpenCV reads) or a folder of images. The
output is a rosbag2 (mcap or sqlite3) with ``/<camera>/image_raw`` (sensor_msgs/Image) or
``/<camera>/image_raw/compressed`` (JPEG) and, for frames that have labels,
``/<camera>/labels`` (vision_msgs/Detection2DArray, same header as the image, boxes in pixels,
``class_id`` the detector class name). Frames of all cameras are written in stamp order, and
the bag time of each message is its header stamp.

The bag is written to a temporary sibling folder and renamed into place at the end, so a fatal
error (missing input, corrupt video) never leaves a half-written bag behind. Bad labels and
unreadable images are skipped, reported and counted in the summary. No ROS install is needed.
"""

import argparse
import collections
from dataclasses import dataclass, field
import heapq
import json
import os
import pathlib
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm
import yaml

from gradclip_ros import bags

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
# Warnings of one kind printed before the rest are only counted, to keep the output readable.
MAX_WARNINGS_PER_REASON = 10


class ConvertError(RuntimeError):
    """A fatal problem: the conversion stops, and no output bag is left behind."""


# ---------------------------------------------------------------------------------------------
# Class names and class map


def default_classes_file() -> Optional[pathlib.Path]:
    """Return the package's config/classes.yaml (source tree or installed share folder)."""
    candidates = [pathlib.Path(__file__).resolve().parents[1] / 'config' / 'classes.yaml']
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix:
            candidates.append(
                pathlib.Path(prefix) / 'share' / 'gradclip_ros' / 'config' / 'classes.yaml')
    return next((path for path in candidates if path.is_file()), None)


def load_yaml_file(path, what: str) -> dict:
    """Read a YAML mapping; raises ConvertError naming the file."""
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConvertError(f'cannot read {what} {path}: {error}') from error
    if not isinstance(data, dict):
        raise ConvertError(f'{what} {path} must be a YAML mapping, got {type(data).__name__}')
    return data


def load_class_map(path) -> Dict[str, str]:
    """Read a dataset class -> detector class mapping.

    The file is either a plain mapping or has it under ``dataset_class_map`` (as
    config/classes.yaml does). An empty target drops the class.
    """
    data = load_yaml_file(path, 'class map')
    mapping = data.get('dataset_class_map', data)
    if not isinstance(mapping, dict):
        raise ConvertError(f'dataset_class_map in {path} must be a mapping')
    return {str(key): '' if value is None else str(value) for key, value in mapping.items()}


class ClassMapper:
    """Map dataset class names to detector classes and count what is dropped.

    A name is looked up in the class map as written, then in lower case; a name that is
    already a detector class maps to itself. Everything else is dropped.
    """

    def __init__(self, class_names: Sequence[str], class_map: Dict[str, str]):
        self.class_names = tuple(class_names)
        self.class_map = dict(class_map)
        self.lower_map = {key.lower(): value for key, value in class_map.items()}
        for source, target in class_map.items():
            if target and target not in self.class_names:
                raise ConvertError(
                    f'class map sends {source!r} to {target!r}, which is not one of the '
                    f'detector classes {list(self.class_names)}')

    def to_detector_class(self, name: str) -> Optional[str]:
        """Return the detector class of dataset class ``name``, or None to drop it."""
        if name in self.class_map:
            return self.class_map[name] or None
        if name.lower() in self.lower_map:
            return self.lower_map[name.lower()] or None
        return name if name in self.class_names else None


# ---------------------------------------------------------------------------------------------
# Labels


@dataclass
class RawBox:
    """One box as the dataset gives it: class name, xyxy pixels, score, and where it came from."""

    class_name: str
    box: Tuple[float, float, float, float]
    score: float
    source: str


@dataclass
class FrameLabels:
    """The labels of one frame. ``size`` (width, height) is the image size the boxes refer to."""

    boxes: List[RawBox]
    size: Optional[Tuple[int, int]] = None
    stamp_ns: Optional[int] = None


class Report:
    """Counts of skipped items by reason, with the first few warnings printed."""

    def __init__(self, stream=None):
        self.skips: collections.Counter = collections.Counter()
        self.notes: collections.Counter = collections.Counter()
        self.stream = sys.stderr if stream is None else stream

    def skip(self, reason: str, message: str, count: int = 1) -> None:
        """Count ``count`` skipped items for ``reason`` and print the first few messages."""
        self.skips[reason] += count
        if self.skips[reason] - count < MAX_WARNINGS_PER_REASON:
            tqdm.write(f'warning: {message} (skipped)', file=self.stream)
        if self.skips[reason] - count < MAX_WARNINGS_PER_REASON <= self.skips[reason]:
            tqdm.write(f'warning: further {reason} warnings are only counted', file=self.stream)

    def note(self, reason: str, count: int = 1) -> None:
        """Count a change that kept the item (for example a box clipped to the image)."""
        self.notes[reason] += count


class CocoLabels:
    """COCO detection labels indexed by image file name and by video frame.

    ``bbox`` is [x, y, w, h] in pixels, top-left origin. Video frames are matched by
    ``"<video>#<frame_index>"`` file names or by the ``video`` and ``frame_index`` fields.
    """

    def __init__(self, path, stamp_field: str, report: Report):
        self.path = pathlib.Path(path)
        self.root = self.path.parent
        self.stamp_field = stamp_field
        if not self.path.is_file():
            raise ConvertError(f'COCO label file not found: {self.path}')
        try:
            data = json.loads(self.path.read_text())
            categories = {int(c['id']): str(c['name']) for c in data.get('categories', [])}
            images = data['images']
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConvertError(f'invalid COCO file {self.path}: {error}') from error

        self.images: Dict[int, dict] = {}
        self.by_name: Dict[str, int] = {}
        self.by_basename: Dict[str, List[int]] = collections.defaultdict(list)
        for image in images:
            try:
                image_id, file_name = int(image['id']), str(image['file_name'])
            except (KeyError, ValueError, TypeError):
                report.skip('invalid_coco_image', f'{self.path}: image entry {image!r} has no '
                            'valid id and file_name')
                continue
            self.images[image_id] = image
            key = file_name
            if 'video' in image and 'frame_index' in image:
                key = f'{pathlib.Path(str(image["video"])).name}#{int(image["frame_index"])}'
            self.by_name[_normalize_name(key)] = image_id
            self.by_basename[pathlib.PurePosixPath(key).name].append(image_id)

        self.boxes: Dict[int, List[RawBox]] = collections.defaultdict(list)
        for index, annotation in enumerate(data.get('annotations', [])):
            where = f'{self.path} annotation {annotation.get("id", f"#{index}")}'
            try:
                image_id = int(annotation['image_id'])
                x, y, w, h = (float(v) for v in annotation['bbox'])
                category = int(annotation['category_id'])
            except (KeyError, ValueError, TypeError) as error:
                report.skip('invalid_annotation', f'{where}: unreadable ({error})')
                continue
            if image_id not in self.images:
                report.skip('annotation_without_image',
                            f'{where}: image_id {image_id} is not in the images list')
                continue
            if category not in categories:
                report.skip('unknown_category', f'{where}: category_id {category} is not in the '
                            'categories list')
                continue
            score = float(annotation.get('score', 1.0))
            self.boxes[image_id].append(
                RawBox(categories[category], (x, y, x + w, y + h), score, where))
        self.matched: set = set()

    def lookup(self, names: Sequence[str]) -> Optional[FrameLabels]:
        """Return the labels of the first of ``names`` (candidate file names) in the COCO file."""
        for name in names:
            image_id = self.by_name.get(_normalize_name(name))
            if image_id is None:
                ids = self.by_basename.get(pathlib.PurePosixPath(name).name, [])
                image_id = ids[0] if len(ids) == 1 else None
            if image_id is not None:
                self.matched.add(image_id)
                image = self.images[image_id]
                size = None
                if 'width' in image and 'height' in image:
                    size = (int(image['width']), int(image['height']))
                stamp = image.get(self.stamp_field)
                return FrameLabels(list(self.boxes.get(image_id, [])), size,
                                   None if stamp is None else int(stamp))
        return None

    def unmatched_in_scope(self, scopes: Sequence[str]) -> List[str]:
        """Return file names of images in the inputs' scope that matched no frame.

        ``scopes`` are folder names (relative to the COCO file) and video file names; an image
        whose file name lies in one of them but was never found is a label without an image.
        """
        missing = []
        for image_id, image in self.images.items():
            if image_id in self.matched:
                continue
            name = str(image['file_name'])
            scope = name.split('#')[0] if '#' in name else str(pathlib.PurePosixPath(name).parent)
            if 'video' in image:
                scope = pathlib.Path(str(image['video'])).name
            if scope in scopes:
                missing.append(name)
        return missing


def _normalize_name(name: str) -> str:
    return str(pathlib.PurePosixPath(name.replace('\\', '/'))).lstrip('./')


class KittiLabels:
    """KITTI object labels: one ``<stem>.txt`` per image (video frames: ``<index:06d>.txt``).

    Columns: type, truncated, occluded, alpha, x1, y1, x2, y2, 3-D size, location, rotation_y
    and an optional score. ``DontCare`` regions are not objects and are ignored.
    """

    def __init__(self, folder, report: Report):
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise ConvertError(f'KITTI label folder not found: {self.folder}')
        self.report = report
        self.files = {path.stem: path for path in sorted(self.folder.glob('*.txt'))}
        self.matched: set = set()

    def lookup(self, stems: Sequence[str]) -> Optional[FrameLabels]:
        """Return the labels of the first of ``stems`` that has a .txt file."""
        for stem in stems:
            path = self.files.get(stem)
            if path is not None:
                self.matched.add(stem)
                return FrameLabels(self._read(path))
        return None

    def _read(self, path: pathlib.Path) -> List[RawBox]:
        boxes = []
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            self.report.skip('unreadable_label_file', f'{path}: {error}')
            return boxes
        for number, line in enumerate(lines, start=1):
            columns = line.split()
            if not columns:
                continue
            where = f'{path}:{number}'
            if columns[0] == 'DontCare':
                self.report.note('kitti_dont_care')
                continue
            if len(columns) < 15:
                self.report.skip('invalid_annotation',
                                 f'{where}: {len(columns)} columns, a KITTI label needs 15 or 16')
                continue
            try:
                x1, y1, x2, y2 = (float(v) for v in columns[4:8])
                score = float(columns[15]) if len(columns) > 15 else 1.0
            except ValueError as error:
                self.report.skip('invalid_annotation', f'{where}: {error}')
                continue
            boxes.append(RawBox(columns[0], (x1, y1, x2, y2), score, where))
        return boxes

    def unmatched(self) -> List[str]:
        """Return the label files that matched no frame."""
        return [str(self.files[stem]) for stem in sorted(set(self.files) - self.matched)]


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(order=True)
class SourceFrame:
    """One frame of one input, ordered by stamp for merging the cameras."""

    stamp_ns: int
    order: int
    camera: str = field(compare=False)
    name: str = field(compare=False)
    image: Optional[np.ndarray] = field(compare=False, default=None)
    error: Optional[str] = field(compare=False, default=None)
    labels: Optional[FrameLabels] = field(compare=False, default=None)


@dataclass
class CameraInput:
    """One camera's input: a video file or a folder of images."""

    camera: str
    path: pathlib.Path

    @property
    def is_video(self) -> bool:
        return self.path.is_file()


def _label_keys(camera_input: CameraInput, frame_path: Optional[pathlib.Path],
                index: int, coco_root: Optional[pathlib.Path]) -> List[str]:
    """Return candidate COCO file names of a frame, most specific first."""
    if frame_path is None:
        return [f'{camera_input.path.name}#{index}']
    keys = []
    if coco_root is not None:
        try:
            keys.append(os.path.relpath(frame_path, coco_root))
        except ValueError:
            pass
    keys.append(os.path.relpath(frame_path, camera_input.path))
    return keys


class FrameSource:
    """Produce the frames of one input in stamp order, with their labels attached."""

    def __init__(self, camera_input: CameraInput, order: int, args, coco: Optional[CocoLabels],
                 kitti: Optional[KittiLabels], report: Report):
        self.input = camera_input
        self.order = order
        self.report = report
        self.coco = coco
        self.kitti = kitti
        if camera_input.is_video:
            self.frames = self._plan_video(args)
        else:
            self.frames = self._plan_folder(args)
        # Labels of the frames cut off here were looked up above, so they are not reported
        # as labels without an image.
        if args.max_frames:
            self.frames = self.frames[:args.max_frames]

    def _labels(self, frame_path: Optional[pathlib.Path], index: int) -> Optional[FrameLabels]:
        if self.coco is not None:
            keys = _label_keys(self.input, frame_path, index, self.coco.root)
            return self.coco.lookup(keys)
        if self.kitti is not None:
            stems = [f'{index:06d}'] if frame_path is None else [frame_path.stem]
            return self.kitti.lookup(stems)
        return None

    def _plan_video(self, args) -> List[Tuple[int, str, Optional[pathlib.Path], FrameLabels]]:
        capture = cv2.VideoCapture(str(self.input.path))
        try:
            if not capture.isOpened():
                raise ConvertError(f'cannot open video {self.input.path}: OpenCV cannot read '
                                   'it (corrupt file or unsupported codec)')
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            fps = args.fps or capture.get(cv2.CAP_PROP_FPS)
        finally:
            capture.release()
        if count <= 0:
            raise ConvertError(f'video {self.input.path} reports {count} frames; it is empty '
                               'or corrupt')
        if not fps or not np.isfinite(fps) or fps <= 0:
            raise ConvertError(f'video {self.input.path} has no frame rate; pass --fps')
        self.expected_frames = count
        labels = [self._labels(None, index) for index in range(count)]
        if args.stamps == 'filename':
            raise ConvertError(f'--stamps filename does not apply to video {self.input.path}')
        fps_stamps = [args.start_ns + round(index * 1e9 / fps) for index in range(count)]
        stamps = self._choose_stamps(labels, None, fps_stamps, args)
        names = [f'{self.input.path}#{index}' for index in range(count)]
        if any(later <= earlier for earlier, later in zip(stamps, stamps[1:])):
            raise ConvertError(f'the stamps of video {self.input.path} do not increase with the '
                               'frame index; check the COCO stamp field or use --stamps fps')
        return list(zip(stamps, names, [None] * count, labels))

    def _plan_folder(self, args) -> List[Tuple[int, str, Optional[pathlib.Path], FrameLabels]]:
        paths = sorted(p for p in self.input.path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ConvertError(f'no images ({", ".join(IMAGE_SUFFIXES)}) found in folder '
                               f'{self.input.path}')
        labels = [self._labels(path, index) for index, path in enumerate(paths)]
        fps_stamps = None
        if args.fps:
            fps_stamps = [args.start_ns + round(i * 1e9 / args.fps) for i in range(len(paths))]
        stamps = self._choose_stamps(labels, paths, fps_stamps, args)
        return sorted(zip(stamps, [str(p) for p in paths], paths, labels), key=lambda x: x[0])

    def _choose_stamps(self, labels: Sequence[Optional[FrameLabels]],
                       paths: Optional[Sequence[pathlib.Path]],
                       fps_stamps: Optional[List[int]], args) -> List[int]:
        """Pick one time source for the whole input, so one camera never mixes two clocks."""
        if args.stamps in ('auto', 'coco') and all(
                lab is not None and lab.stamp_ns is not None for lab in labels):
            return [lab.stamp_ns for lab in labels]
        if args.stamps == 'coco':
            raise ConvertError(f'--stamps coco: not every frame of {self.input.path} has a COCO '
                               f'image with the field {args.stamp_field!r}')
        if args.stamps in ('auto', 'filename') and paths is not None and all(
                p.stem.isdigit() for p in paths):
            return [int(p.stem) for p in paths]
        if args.stamps == 'filename':
            raise ConvertError(f'--stamps filename: not every image name in {self.input.path} '
                               'is a nanosecond stamp')
        if fps_stamps is None:
            raise ConvertError(
                f'no time stamps for the images in {self.input.path}: neither the COCO field '
                f'{args.stamp_field!r} nor nanosecond-stamp file names cover every image; '
                'pass --fps to space them evenly')
        return fps_stamps

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[SourceFrame]:
        if self.input.is_video:
            yield from self._iter_video()
            return
        for stamp, name, path, labels in self.frames:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            error = None if image is not None else 'OpenCV cannot decode the image'
            if image is not None:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            yield SourceFrame(stamp, self.order, self.input.camera, name, image, error, labels)

    def _iter_video(self) -> Iterator[SourceFrame]:
        capture = cv2.VideoCapture(str(self.input.path))
        try:
            for index, (stamp, name, _, labels) in enumerate(self.frames):
                ok, image = capture.read()
                if not ok or image is None:
                    raise ConvertError(
                        f'video {self.input.path} ended after {index} of '
                        f'{self.expected_frames} frames: the file is truncated or corrupt')
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                yield SourceFrame(stamp, self.order, self.input.camera, name, image, None,
                                  labels)
        finally:
            capture.release()


# ---------------------------------------------------------------------------------------------
# Boxes


def clean_boxes(labels: FrameLabels, image_size: Tuple[int, int], mapper: ClassMapper,
                frame_name: str, report: Report) -> Tuple[np.ndarray, List[str], List[float]]:
    """Map classes and clip boxes to the image; return xyxy [N, 4], class names and scores.

    Boxes entirely outside the image, with a non-positive size or a non-finite coordinate are
    skipped and counted; boxes partly outside are clipped and counted as a note.
    """
    width, height = image_size
    boxes, names, scores = [], [], []
    for raw in labels.boxes:
        target = mapper.to_detector_class(raw.class_name)
        if target is None:
            report.skip('unmapped_class', f'{raw.source} on {frame_name}: class '
                        f'{raw.class_name!r} maps to no detector class')
            continue
        x1, y1, x2, y2 = raw.box
        if not all(np.isfinite(raw.box)) or x2 <= x1 or y2 <= y1:
            report.skip('invalid_box', f'{raw.source} on {frame_name}: box {raw.box} has a '
                        'non-positive size or a non-finite coordinate')
            continue
        clipped = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            report.skip('box_outside_image', f'{raw.source} on {frame_name}: box {raw.box} lies '
                        f'outside the {width}x{height} image')
            continue
        if clipped != (x1, y1, x2, y2):
            report.note('boxes_clipped_to_image')
        boxes.append(clipped)
        names.append(target)
        scores.append(raw.score)
    return np.asarray(boxes, np.float64).reshape(-1, 4), names, scores


# ---------------------------------------------------------------------------------------------
# Conversion


@dataclass
class Summary:
    """Frames, boxes and skips of one conversion."""

    output: pathlib.Path
    frames: collections.Counter
    labeled_frames: collections.Counter
    boxes: collections.Counter
    skips: collections.Counter
    notes: collections.Counter
    seconds: float

    def as_dict(self) -> dict:
        return {
            'output': str(self.output),
            'frames': dict(self.frames), 'labeled_frames': dict(self.labeled_frames),
            'boxes': dict(self.boxes), 'skipped': dict(self.skips), 'notes': dict(self.notes),
            'seconds': round(self.seconds, 3),
        }

    def to_text(self) -> str:
        lines = [
            f'wrote {self.output} in {self.seconds:.1f} s',
            f'  frames: {sum(self.frames.values())} ({bags.frames_per_camera(self.frames)})',
            f'  labeled frames: {sum(self.labeled_frames.values())}, boxes written: '
            f'{sum(self.boxes.values())}'
            + (f' ({bags.frames_per_camera(self.boxes)})' if self.boxes else ''),
        ]
        if self.skips:
            lines.append(f'  skipped: {sum(self.skips.values())} ('
                         + ', '.join(f'{k}={v}' for k, v in sorted(self.skips.items())) + ')')
        else:
            lines.append('  skipped: 0')
        if self.notes:
            notes = ', '.join(f'{k}={v}' for k, v in sorted(self.notes.items()))
            lines.append(f'  notes: {notes}')
        return '\n'.join(lines)


def parse_resize(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """Parse ``WxH`` into (width, height)."""
    if not text:
        return None
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise ConvertError(f'invalid --resize {text!r}; expected WIDTHxHEIGHT, e.g. 960x540')
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise ConvertError(f'invalid --resize {text!r}; each side must be 1..16384 pixels')
    return width, height


def collect_inputs(args) -> List[CameraInput]:
    """Turn ``--input/--camera`` and ``--camera-dir NAME=PATH`` into camera inputs."""
    inputs = []
    if args.input:
        inputs.append(CameraInput(args.camera or 'camera', pathlib.Path(args.input)))
    for spec in args.camera_dir or []:
        name, sep, path = spec.partition('=')
        if not sep or not name or not path:
            raise ConvertError(f'invalid --camera-dir {spec!r}; expected NAME=PATH')
        inputs.append(CameraInput(name.strip('/'), pathlib.Path(path)))
    if not inputs:
        raise ConvertError('no input: pass --input PATH (with --camera NAME) or '
                           '--camera-dir NAME=PATH')
    names = [item.camera for item in inputs]
    if len(set(names)) != len(names):
        raise ConvertError(f'camera names must be unique, got {names}')
    for item in inputs:
        if not item.path.exists():
            raise ConvertError(f'input not found: {item.path} (camera {item.camera})')
    return inputs


def convert(args, stream=None) -> Summary:
    """Run a conversion described by parsed ``args``; raises ConvertError on fatal errors.

    Warnings and the progress bar go to ``stream`` (default: sys.stderr).
    """
    started = time.monotonic()
    report = Report(stream)
    stream = report.stream
    inputs = collect_inputs(args)
    resize = parse_resize(args.resize)
    if args.max_frames < 0:
        raise ConvertError(f'--max-frames must be >= 0 (0 = all), got {args.max_frames}')
    if args.coco and args.kitti:
        raise ConvertError('pass either --coco or --kitti, not both')

    classes_file = default_classes_file()
    class_names = args.classes
    if not class_names:
        if classes_file is None:
            raise ConvertError('config/classes.yaml not found; pass --classes')
        class_names = load_yaml_file(classes_file, 'class file').get('class_names')
    class_map_file = args.class_map or classes_file
    class_map = load_class_map(class_map_file) if class_map_file else {}
    mapper = ClassMapper(class_names, class_map)

    coco = CocoLabels(args.coco, args.stamp_field, report) if args.coco else None
    kitti = KittiLabels(args.kitti, report) if args.kitti else None
    sources = [FrameSource(item, order, args, coco, kitti, report)
               for order, item in enumerate(inputs)]

    frames, labeled, boxes_written = (collections.Counter() for _ in range(3))
    seen_stamps = set()
    total = sum(len(source) for source in sources)
    with bags.BagWriter(args.output, args.storage, overwrite=args.overwrite) as writer:
        typestore = writer.typestore
        with tqdm(total=total, unit='frame', desc='convert', file=stream,
                  disable=args.no_progress) as progress:
            for frame in heapq.merge(*sources):
                progress.update(1)
                frame_id = args.frame_id.format(camera=frame.camera)
                if frame.image is None:
                    report.skip('unreadable_image', f'{frame.name}: {frame.error}')
                    continue
                if (frame.camera, frame.stamp_ns) in seen_stamps:
                    report.skip('duplicate_stamp', f'{frame.name}: camera {frame.camera} already '
                                f'has a frame at stamp {frame.stamp_ns} ns')
                    continue
                seen_stamps.add((frame.camera, frame.stamp_ns))
                _write_frame(writer, typestore, frame, frame_id, resize, mapper, args, report,
                             frames, labeled, boxes_written)

    _report_unmatched_labels(inputs, coco, kitti, report)
    return Summary(pathlib.Path(args.output), frames, labeled, boxes_written, report.skips,
                   report.notes, time.monotonic() - started)


def _write_frame(writer, typestore, frame: SourceFrame, frame_id: str, resize, mapper, args,
                 report: Report, frames, labeled, boxes_written) -> None:
    image = frame.image
    height, width = image.shape[:2]
    labels = frame.labels
    if labels is not None and labels.size is not None and labels.size != (width, height):
        report.skip('label_size_mismatch',
                    f'{frame.name}: labels are for a {labels.size[0]}x{labels.size[1]} image, '
                    f'but the image is {width}x{height}; its labels are dropped')
        labels = None

    if labels is not None:
        boxes, names, scores = clean_boxes(labels, (width, height), mapper, frame.name, report)
    if resize is not None and resize != (width, height):
        image = cv2.resize(image, resize, interpolation=cv2.INTER_AREA)
        if labels is not None:
            boxes = boxes * np.array([resize[0] / width, resize[1] / height] * 2)

    if args.compressed:
        msg = bags.make_compressed_image(typestore, image, frame.stamp_ns, frame_id,
                                         args.jpeg_quality)
    else:
        msg = bags.make_image(typestore, image, frame.stamp_ns, frame_id, args.encoding)
    writer.write(bags.image_topic(frame.camera, args.compressed), msg, frame.stamp_ns)
    frames[frame.camera] += 1

    if labels is not None:
        detections = bags.make_detections(typestore, frame.stamp_ns, frame_id, boxes, names,
                                          scores)
        writer.write(bags.labels_topic(frame.camera), detections, frame.stamp_ns)
        labeled[frame.camera] += 1
        boxes_written[frame.camera] += len(names)


def _report_unmatched_labels(inputs: Sequence[CameraInput], coco: Optional[CocoLabels],
                             kitti: Optional[KittiLabels], report: Report) -> None:
    if coco is not None:
        scopes = []
        for item in inputs:
            if item.is_video:
                scopes.append(item.path.name)
            else:
                try:
                    scopes.append(os.path.relpath(item.path, coco.root))
                except ValueError:
                    pass
                scopes.append(item.path.name)
        for name in coco.unmatched_in_scope(scopes):
            report.skip('label_without_image',
                        f'{coco.path}: image {name!r} has labels but no such frame in the inputs')
    if kitti is not None:
        for path in kitti.unmatched():
            report.skip('label_without_image', f'{path}: no image with this name in the inputs')


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` options to ``parser``."""
    source = parser.add_argument_group('inputs')
    source.add_argument('--input', '-i', help='a video file or a folder of images (one camera)')
    source.add_argument('--camera', help='camera name of --input (default: camera); topics are '
                        '/<camera>/image_raw and /<camera>/labels')
    source.add_argument('--camera-dir', action='append', metavar='NAME=PATH',
                        help='a camera name and its video or image folder; repeat for '
                        'several cameras')
    labels = parser.add_argument_group('labels')
    labels.add_argument('--coco', metavar='FILE', help='COCO JSON labels; images are matched by '
                        'file_name (relative to the JSON file), video frames by '
                        '"<video>#<frame_index>"')
    labels.add_argument('--kitti', metavar='DIR', help='KITTI label folder: <image stem>.txt '
                        'per image, <frame index:06d>.txt per video frame')
    labels.add_argument('--class-map', metavar='FILE', help='YAML mapping dataset class -> '
                        'detector class, plain or under dataset_class_map (default: '
                        'config/classes.yaml); unmapped classes are dropped and counted')
    labels.add_argument('--classes', nargs='+', metavar='NAME', help='detector class names '
                        '(default: class_names of config/classes.yaml)')
    timing = parser.add_argument_group('time stamps')
    timing.add_argument('--stamps', choices=('auto', 'coco', 'filename', 'fps'), default='auto',
                        help='where header stamps come from; auto: the COCO stamp field, else '
                        'file names that are nanosecond stamps, else --fps (default: auto)')
    timing.add_argument('--stamp-field', default='stamp_ns',
                        help='COCO image field with the stamp in ns (default: stamp_ns)')
    timing.add_argument('--fps', type=float, help='frames per second for evenly spaced stamps '
                        '(videos default to the container frame rate)')
    timing.add_argument('--start-ns', type=int, default=0,
                        help='stamp of the first frame for --fps stamps, in ns (default: 0)')
    output = parser.add_argument_group('output')
    output.add_argument('--output', '-o', required=True, help='rosbag2 folder to create')
    output.add_argument('--storage', choices=tuple(bags.STORAGE_PLUGINS), default='mcap',
                        help='rosbag2 storage plugin (default: mcap)')
    output.add_argument('--compressed', action='store_true',
                        help='write JPEG sensor_msgs/CompressedImage on '
                        '/<camera>/image_raw/compressed instead of raw images')
    output.add_argument('--jpeg-quality', type=int, default=90, choices=range(1, 101),
                        metavar='1..100', help='JPEG quality for --compressed (default: 90)')
    output.add_argument('--encoding', choices=('rgb8', 'bgr8'), default='rgb8',
                        help='raw image encoding (default: rgb8)')
    output.add_argument('--frame-id', default='{camera}_optical_frame',
                        help='header frame_id; {camera} is replaced by the camera name '
                        '(default: {camera}_optical_frame)')
    output.add_argument('--resize', metavar='WxH', help='resize every frame to WIDTHxHEIGHT '
                        'pixels; boxes are scaled to match')
    output.add_argument('--max-frames', type=int, default=0, metavar='N',
                        help='write only the first N frames (in stamp order) of each camera; '
                        '0 writes all (default: 0)')
    output.add_argument('--overwrite', action='store_true',
                        help='replace an existing output bag (only once the new one is complete)')
    output.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    output.add_argument('--json', action='store_true',
                        help='print the summary as one JSON object')


def main(args) -> int:
    """Run ``gradclip-ros convert``; returns 0 on success and 1 on a fatal error."""
    try:
        summary = convert(args)
    except (ConvertError, bags.BagError) as error:
        print(f'error: {error}; no bag was written', file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()) if args.json else summary.to_text())
    return 0


if __name__ == '__main__':
    _parser = argparse.ArgumentParser(prog='gradclip-ros convert', description=__doc__)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
