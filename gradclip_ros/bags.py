"""Read and write rosbags (rosbag2 mcap or sqlite3, ROS 1) without a ROS install.

Everything goes through the ``rosbags`` package. Our ``vision_msgs`` types are registered in
the typestore from the .msg files of the interface package, so bags that carry
``vision_msgs/msg/Detection2DArray`` labels can be written and read anywhere.

Topic layout (as stored in bags, with a leading slash): ``/<camera>/image_raw``
(sensor_msgs/Image) or ``/<camera>/image_raw/compressed`` (sensor_msgs/CompressedImage), and
``/<camera>/labels`` (vision_msgs/Detection2DArray, boxes in pixels of that image, ``class_id``
the class name, header stamp equal to the image's).
"""

import collections
import contextlib
from dataclasses import dataclass
import functools
import io
import logging
import os
import pathlib
import re
import shutil
import struct
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from rosbags.convert.converter import generate_message_converter
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag1 import ReaderError as Ros1ReaderError
from rosbags.rosbag1.reader import decompressors as ros1_decompressors
from rosbags.rosbag1.reader import normalize as ros1_normalize_topic
from rosbags.rosbag2 import ReaderError as Ros2ReaderError
from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
from rosbags.rosbag2.storage_mcap import decompress as mcap_decompress
from rosbags.serde import SerdeError
from rosbags.typesys import get_types_from_msg, get_typestore, Stores
from rosbags.typesys.msg import normalize_msgtype
from rosbags.typesys.store import Typestore

from gradclip_ros.images import encode_compressed, ImageError, message_to_rgb, rgb_to_image_fields

LOGGER = logging.getLogger(__name__)

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE_TYPE = 'sensor_msgs/msg/CompressedImage'
DETECTIONS_TYPE = 'vision_msgs/msg/Detection2DArray'
LABEL_INFO_TYPE = 'vision_msgs/msg/LabelInfo'
CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)

# The typestore matches the ROS distribution the package targets; the message definitions
# of sensor_msgs and std_msgs used here are identical from Humble to Kilted.
DEFAULT_STORE = Stores.ROS2_KILTED

STORAGE_PLUGINS = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}

_CAMERA_TOPIC = re.compile(r'^/?(?P<camera>.+)/image_raw(?P<compressed>/compressed)?$')
_REPO_MSG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'tools' / 'interfaces' / \
    'vision_msgs' / 'msg'

# Exceptions that rosbags raises for unreadable, truncated or corrupt files.
READ_ERRORS = (AnyReaderError, Ros1ReaderError, Ros2ReaderError, SerdeError, OSError,
               EOFError, ValueError, KeyError, IndexError, AssertionError)


class BagError(RuntimeError):
    """A bag that cannot be opened or read; the message names the file and the reason."""


class BagReadError(BagError):
    """A bag that stopped being readable part-way through.

    ``messages_read`` messages were returned before the failure, the last one at bag time
    ``last_timestamp_ns`` (None when nothing was read).
    """

    def __init__(self, message: str, messages_read: int, last_timestamp_ns: Optional[int]):
        super().__init__(message)
        self.messages_read = messages_read
        self.last_timestamp_ns = last_timestamp_ns


# ---------------------------------------------------------------------------------------------
# Typestore


def _vision_msgs_dirs() -> List[pathlib.Path]:
    """Return candidate folders with the vision_msgs .msg files, repository first."""
    candidates = [_REPO_MSG_DIR]
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix:
            candidates.append(pathlib.Path(prefix) / 'share' / 'vision_msgs' / 'msg')
    return [path for path in candidates if (path / 'Detection2DArray.msg').is_file()]


def vision_msgs_types() -> Dict[str, object]:
    """Parse the vision_msgs .msg files into rosbags type definitions.

    Raises BagError when neither the repository's ``tools/interfaces/vision_msgs/msg`` nor an
    installed ``share/vision_msgs/msg`` folder is found.
    """
    folders = _vision_msgs_dirs()
    if not folders:
        raise BagError(
            f'vision_msgs message definitions not found in {_REPO_MSG_DIR} or in '
            'share/vision_msgs/msg under AMENT_PREFIX_PATH; source tools/env.sh first')
    types = {}
    for msg_file in sorted(folders[0].glob('*.msg')):
        types.update(get_types_from_msg(msg_file.read_text(), f'vision_msgs/msg/{msg_file.stem}'))
    return types


@functools.lru_cache(maxsize=None)
def get_bag_typestore(store: Stores = DEFAULT_STORE) -> Typestore:
    """Return a rosbags typestore of ``store`` with our vision_msgs types registered."""
    typestore = get_typestore(store)
    typestore.register(vision_msgs_types())
    return typestore


# ---------------------------------------------------------------------------------------------
# Small helpers


def stamp_to_ns(stamp) -> int:
    """Convert a builtin_interfaces/Time (``sec``, ``nanosec``) into integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def camera_of_topic(topic: str) -> Optional[str]:
    """Return the camera name of an image topic (``/front/image_raw`` -> ``front``), or None."""
    match = _CAMERA_TOPIC.match(topic)
    return match.group('camera') if match else None


def image_topic(camera: str, compressed: bool = False) -> str:
    """Return the bag topic of a camera's images."""
    return f'/{camera.strip("/")}/image_raw' + ('/compressed' if compressed else '')


def labels_topic(camera: str) -> str:
    """Return the bag topic of a camera's labels."""
    return f'/{camera.strip("/")}/labels'


def detections_to_arrays(msg, class_names: Sequence[str]
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, collections.Counter]:
    """Turn a Detection2DArray into boxes, labels and scores, with counted drops.

    Returns ``boxes`` float32 [N, 4] xyxy pixels, ``labels`` int64 [N] (0-based into
    ``class_names``), ``scores`` float32 [N] and a Counter of dropped boxes by reason
    (``unknown_class``, ``no_hypothesis``, ``invalid_box``). The hypothesis with the highest
    score names the class.
    """
    index = {name: i for i, name in enumerate(class_names)}
    boxes, labels, scores = [], [], []
    dropped = collections.Counter()
    for detection in msg.detections:
        if not detection.results:
            dropped['no_hypothesis'] += 1
            continue
        best = max(detection.results, key=lambda result: result.hypothesis.score)
        class_id = best.hypothesis.class_id
        if class_id not in index:
            dropped['unknown_class'] += 1
            continue
        center = detection.bbox.center.position
        half_w, half_h = detection.bbox.size_x / 2.0, detection.bbox.size_y / 2.0
        box = [center.x - half_w, center.y - half_h, center.x + half_w, center.y + half_h]
        if not np.all(np.isfinite(box)) or half_w <= 0 or half_h <= 0:
            dropped['invalid_box'] += 1
            continue
        boxes.append(box)
        labels.append(index[class_id])
        scores.append(best.hypothesis.score)
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
            np.asarray(scores, np.float32), dropped)


# ---------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def open_bag(path) -> Iterator[AnyReader]:
    """Open a rosbag2 folder, .mcap or .db3 file, or ROS 1 .bag file for reading.

    A context manager that yields the open ``AnyReader`` and closes it afterwards. Bags
    without embedded message definitions fall back to our typestore. Raises BagError naming
    the file for a missing, unrecognized, truncated or corrupt bag.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise BagError(f'bag not found: {path}')
    try:
        reader = AnyReader([path], default_typestore=get_bag_typestore())
        reader.open()
    except READ_ERRORS as error:
        raise BagError(f'cannot open bag {path}: {type(error).__name__}: {error}') from error
    try:
        yield reader
    finally:
        reader.close()


def list_topics(path) -> Dict[str, Tuple[str, int]]:
    """Return ``{topic: (message type, message count)}`` of a bag."""
    with open_bag(path) as reader:
        return {name: (info.msgtype, info.msgcount) for name, info in reader.topics.items()}


def list_cameras(path) -> List[str]:
    """Return the camera names that have ``/<camera>/image_raw[/compressed]`` topics."""
    cameras = set()
    for topic, (msgtype, _) in list_topics(path).items():
        camera = camera_of_topic(topic)
        if camera and msgtype in IMAGE_TYPES:
            cameras.add(camera)
    return sorted(cameras)


def read_messages(reader: AnyReader, connections=(), start: Optional[int] = None,
                  stop: Optional[int] = None) -> Iterator[Tuple[object, int, bytes]]:
    """Yield ``(connection, bag time ns, raw bytes)`` and turn read failures into BagReadError.

    A bag that breaks part-way yields everything before the break, then raises BagReadError
    with the number of messages read and the bag time of the last one.
    """
    count, last = 0, None
    path = reader.paths[0]
    try:
        for connection, timestamp, raw in reader.messages(
                connections=connections, start=start, stop=stop):
            yield connection, timestamp, raw
            count += 1
            last = timestamp
    except READ_ERRORS as error:
        where = 'before the first message' if last is None else \
            f'after {count} messages (last bag time {last} ns)'
        raise BagReadError(
            f'bag {path} is truncated or corrupt: reading stopped {where}: '
            f'{type(error).__name__}: {error}', count, last) from error


def deserialize(reader: AnyReader, connection, raw: bytes):
    """Deserialize one message of ``connection``; raises BagError naming topic and type."""
    try:
        return reader.deserialize(raw, connection.msgtype)
    except READ_ERRORS as error:
        raise BagError(
            f'cannot deserialize a {connection.msgtype} message on {connection.topic} in '
            f'{reader.paths[0]}: {error}') from error


def decode_rgb(msg) -> np.ndarray:
    """Decode an Image or CompressedImage into a writable RGB uint8 [H, W, 3] array.

    Raises ImageError. rosbags hands out read-only buffers, and torch warns about (and may
    misbehave on) tensors made from read-only arrays, so those are copied.
    """
    image = message_to_rgb(msg)
    return image if image.flags.writeable else image.copy()


@dataclass
class Frame:
    """One decoded image of a bag.

    ``image`` is RGB uint8 [H, W, 3]; ``stamp_ns`` is the header stamp and ``bag_time_ns`` the
    time the message was recorded.
    """

    camera: str
    topic: str
    stamp_ns: int
    bag_time_ns: int
    frame_id: str
    image: np.ndarray


@dataclass
class LabeledFrame:
    """One image with its ground-truth boxes.

    ``image`` RGB uint8 [H, W, 3]; ``boxes`` float32 [N, 4] xyxy pixels of that image;
    ``labels`` int64 [N], 0-based indices into the ``class_names`` given to
    ``iter_labeled_frames``; ``stamp_ns`` the header stamp shared by image and labels.
    """

    camera: str
    stamp_ns: int
    frame_id: str
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def _image_connections(reader: AnyReader, cameras: Optional[Sequence[str]]):
    """Return the image connections of the requested cameras (all cameras when None)."""
    wanted = None if cameras is None else {camera.strip('/') for camera in cameras}
    selected = []
    for connection in reader.connections:
        camera = camera_of_topic(connection.topic)
        if camera is None or connection.msgtype not in IMAGE_TYPES:
            continue
        if wanted is None or camera in wanted:
            selected.append(connection)
    if wanted is not None:
        missing = wanted - {camera_of_topic(c.topic) for c in selected}
        if missing:
            found = sorted({camera_of_topic(c.topic) for c in reader.connections
                            if camera_of_topic(c.topic)} - {None})
            raise BagError(
                f'camera(s) {", ".join(sorted(missing))} not found in {reader.paths[0]}; '
                f'cameras in the bag: {", ".join(found) or "none"}')
    return selected


def iter_frames(bag_path, cameras: Optional[Sequence[str]] = None,
                counters: Optional[collections.Counter] = None) -> Iterator[Frame]:
    """Yield every decoded image of the given cameras (all when None) in bag-time order.

    Undecodable images are skipped with a warning and counted in ``counters`` under
    ``undecodable_images``. A bag that breaks part-way raises BagReadError after the frames
    before the break.
    """
    counters = collections.Counter() if counters is None else counters
    with open_bag(bag_path) as reader:
        connections = _image_connections(reader, cameras)
        if not connections:
            return
        for connection, timestamp, raw in read_messages(reader, connections):
            msg = deserialize(reader, connection, raw)
            try:
                image = decode_rgb(msg)
            except ImageError as error:
                counters['undecodable_images'] += 1
                LOGGER.warning('skipping image at bag time %d on %s in %s: %s',
                               timestamp, connection.topic, bag_path, error)
                continue
            yield Frame(camera_of_topic(connection.topic), connection.topic,
                        stamp_to_ns(msg.header.stamp), timestamp, msg.header.frame_id, image)


def _read_labels(reader: AnyReader, cameras: Sequence[str], class_names: Sequence[str],
                 counters: collections.Counter) -> Dict[Tuple[str, int], Tuple]:
    """Read every labels message of ``cameras`` into ``{(camera, stamp ns): (boxes, labels)}``."""
    topics = {labels_topic(camera): camera for camera in cameras}
    connections = [c for c in reader.connections
                   if c.topic in topics and c.msgtype == DETECTIONS_TYPE]
    labels = {}
    if not connections:
        return labels
    for connection, _, raw in read_messages(reader, connections):
        msg = deserialize(reader, connection, raw)
        boxes, label_ids, _, dropped = detections_to_arrays(msg, class_names)
        for reason, count in dropped.items():
            counters[f'{reason}_boxes'] += count
        key = (topics[connection.topic], stamp_to_ns(msg.header.stamp))
        if key in labels:
            counters['duplicate_labels'] += 1
            previous_boxes, previous_ids = labels[key]
            boxes = np.concatenate([previous_boxes, boxes])
            label_ids = np.concatenate([previous_ids, label_ids])
        labels[key] = (boxes, label_ids)
    return labels


def iter_labeled_frames(bag_path, class_names: Sequence[str],
                        cameras: Optional[Sequence[str]] = None,
                        counters: Optional[collections.Counter] = None
                        ) -> Iterator[LabeledFrame]:
    """Yield every image that has a labels message with the same header stamp.

    Images come from ``/<camera>/image_raw`` or ``/<camera>/image_raw/compressed`` and labels
    from ``/<camera>/labels`` of each camera in ``cameras`` (all cameras of the bag when None),
    in bag-time order. Boxes whose ``class_id`` is not in ``class_names`` are dropped.

    ``counters`` (optional) receives the counts of what was skipped: ``unknown_class_boxes``,
    ``invalid_box_boxes``, ``no_hypothesis_boxes``, ``unlabeled_images``,
    ``unmatched_labels`` (labels whose stamp has no image), ``duplicate_labels`` (merged) and
    ``undecodable_images``. A summary of the drops is logged at the end.
    """
    counters = collections.Counter() if counters is None else counters
    with open_bag(bag_path) as reader:
        connections = _image_connections(reader, cameras)
        camera_names = sorted({camera_of_topic(c.topic) for c in connections})
        labels = _read_labels(reader, camera_names, class_names, counters)

        # Labels are small, so they are read first; only images with labels get decoded.
        matched = set()
        for connection, _, raw in read_messages(reader, connections):
            msg = deserialize(reader, connection, raw)
            camera = camera_of_topic(connection.topic)
            key = (camera, stamp_to_ns(msg.header.stamp))
            if key not in labels:
                counters['unlabeled_images'] += 1
                continue
            try:
                image = decode_rgb(msg)
            except ImageError as error:
                counters['undecodable_images'] += 1
                LOGGER.warning('skipping labeled image %s at stamp %d in %s: %s',
                               connection.topic, key[1], bag_path, error)
                continue
            matched.add(key)
            boxes, label_ids = labels[key]
            yield LabeledFrame(camera, key[1], msg.header.frame_id, image, boxes, label_ids)

        counters['unmatched_labels'] += len(set(labels) - matched)
    drops = {key: value for key, value in counters.items() if value}
    if drops:
        LOGGER.info('labeled frames of %s: skipped %s', bag_path, dict(sorted(drops.items())))


def decode_image_native(msg) -> np.ndarray:
    """Decode a sensor_msgs/Image into its native dtype and channels (no colour conversion).

    Returns [H, W] for one-channel encodings (mono16 and 16UC1 depth come back as uint16 in
    the machine's byte order) and [H, W, C] otherwise. Raises ImageError when the buffer is
    shorter than ``step * height`` or the encoding is unknown.
    """
    from rosbags.image import image as rosbags_image

    data = np.frombuffer(memoryview(msg.data).cast('B'), np.uint8)
    if msg.height <= 0 or msg.width <= 0 or len(data) < msg.step * msg.height:
        raise ImageError(f'{msg.encoding} image {msg.width}x{msg.height} with step {msg.step} '
                         f'has {len(data)} bytes of data')
    try:
        bits, _, dtype, channels = rosbags_image.to_cvtype(msg.encoding)
    except rosbags_image.ImageFormatError as error:
        raise ImageError(f'unknown encoding {msg.encoding!r}: {error}') from error
    item = np.dtype(dtype).itemsize
    rows = data[:msg.step * msg.height].reshape(msg.height, msg.step)
    pixels = rows[:, :msg.width * channels * item].copy().view(
        np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<'))
    shape = (msg.height, msg.width) if channels == 1 else (msg.height, msg.width, channels)
    return pixels.reshape(shape).astype(np.dtype(dtype).newbyteorder('='))


# ---------------------------------------------------------------------------------------------
# Messages as ROS 2 CDR bytes (for publishing)


@dataclass(frozen=True)
class BagTopic:
    """One topic of a bag: name, ROS 2 message type and message count."""

    name: str
    msgtype: str
    count: int


@dataclass
class BagMessage:
    """One message as ROS 2 CDR bytes (with the 4-byte encapsulation header)."""

    topic: str
    msgtype: str
    bag_time_ns: int
    cdr: bytes


def cdr_header(cdr: bytes) -> Tuple[int, str]:
    """Return (stamp ns, frame_id) of a CDR message whose first field is a std_msgs/Header.

    This holds for Image, CompressedImage and Detection2DArray; reading the first bytes is much
    cheaper than deserializing a full-HD image. Raises struct.error on a too-short buffer.
    """
    # Byte 1 of the encapsulation header: 0 = big-endian CDR, 1 = little-endian CDR.
    order = '<' if cdr[1] & 1 else '>'
    sec, nanosec, size = struct.unpack_from(order + 'iII', cdr, 4)
    frame_id = bytes(cdr[16:16 + max(0, size - 1)]).decode('utf-8', 'replace')
    return sec * 1_000_000_000 + nanosec, frame_id


class BagSource:
    """Messages of one bag as ROS 2 CDR bytes, in bag-time order (file order when salvaged).

    rosbag2 messages are passed through unchanged. ROS 1 messages are converted to CDR with
    rosbags (``std_msgs/Header.seq`` is dropped); ROS 1 types that have no ROS 2 definition in
    our typestore are listed in ``unsupported`` and not returned.

    When rosbags cannot open an MCAP or ROS 1 file because it is truncated (no index or
    footer), the file is scanned record by record instead (``salvaged`` is the reason), and
    ``messages()`` returns what precedes the damage, then raises BagReadError. A bag with no
    readable message at all raises BagError here.
    """

    def __init__(self, path, salvage: bool = True):
        self.path = pathlib.Path(path)
        self.salvaged: Optional[str] = None
        self.unsupported: Dict[str, str] = {}
        self._reader: Optional[AnyReader] = None
        self._scanner: Optional[_Scanner] = None
        self._stack = contextlib.ExitStack()
        try:
            self._reader = self._stack.enter_context(open_bag(self.path))
        except BagError as error:
            if not salvage:
                raise
            try:
                scanner = _Scanner.for_path(self.path)
            except BagReadError as scan_error:
                raise BagError(f'{error}; scanning it record by record found no readable '
                               f'message either: {scan_error}') from scan_error
            if scanner is None:
                raise
            self.salvaged = str(error)
            self._scanner = scanner
        self.is_ros1 = (self._reader.is2 is False) if self._reader else self._scanner.is_ros1
        self._target = get_bag_typestore()
        self._converters: Dict[int, object] = {}
        self._cache: Dict[str, object] = {}
        self.topics = self._collect_topics()

    def _collect_topics(self) -> Dict[str, BagTopic]:
        if self._reader is not None:
            items = [(c.topic, c.msgtype, c.msgcount) for c in self._reader.connections]
        else:
            items = [(c.topic, c.msgtype, c.msgcount) for c in self._scanner.connections.values()]
        counts: collections.Counter = collections.Counter()
        types = {}
        for topic, msgtype, count in items:
            counts[topic] += count
            types[topic] = msgtype
            if self.is_ros1 and msgtype not in self._target.fielddefs:
                self.unsupported[topic] = msgtype
        return {topic: BagTopic(topic, types[topic], counts[topic]) for topic in sorted(types)}

    @property
    def start_ns(self) -> int:
        """Bag time of the first message in ns (0 for an empty bag)."""
        if self._reader is not None:
            return self._reader.start_time if self._reader.message_count else 0
        return self._scanner.start_ns

    @property
    def end_ns(self) -> int:
        """Bag time of the last message in ns (0 for an empty bag)."""
        if self._reader is not None:
            return self._reader.end_time - 1 if self._reader.message_count else 0
        return self._scanner.end_ns

    def typestore(self) -> Typestore:
        """Return the typestore that deserializes this bag's raw messages."""
        return self._reader.typestore if self._reader is not None else self._scanner.typestore

    def _to_cdr(self, connection_key, msgtype: str, raw) -> bytes:
        if not self.is_ros1:
            return raw if isinstance(raw, bytes) else bytes(raw)
        converter = self._converters.get(connection_key)
        if converter is None:
            converter = generate_message_converter(
                self.typestore(), self._target, msgtype, msgtype, self._cache,
                src_is2=False, dst_is2=True)
            self._converters[connection_key] = converter
        return bytes(converter(raw))

    def messages(self, topics: Optional[Sequence[str]] = None,
                 start_ns: Optional[int] = None) -> Iterator[BagMessage]:
        """Yield the messages of ``topics`` (all supported topics when None) from ``start_ns``.

        Raises BagReadError after the last readable message of a damaged bag.
        """
        wanted = set(self.topics) - set(self.unsupported) if topics is None else set(topics)
        if self._reader is not None:
            connections = [c for c in self._reader.connections if c.topic in wanted]
            if not connections:
                return
            for connection, timestamp, raw in read_messages(self._reader, connections,
                                                            start=start_ns):
                yield BagMessage(connection.topic, connection.msgtype, timestamp,
                                 self._to_cdr(connection.id, connection.msgtype, raw))
            return
        for connection, timestamp, raw in self._scanner.messages():
            if connection.topic in wanted and (start_ns is None or timestamp >= start_ns):
                yield BagMessage(connection.topic, connection.msgtype, timestamp,
                                 self._to_cdr(connection.key, connection.msgtype, raw))

    def close(self) -> None:
        """Close the underlying reader."""
        self._stack.close()

    def __enter__(self) -> 'BagSource':
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


# ---------------------------------------------------------------------------------------------
# Record-by-record scanning of damaged MCAP and ROS 1 files


@dataclass
class _ScanConnection:
    key: object
    topic: str
    msgtype: str
    msgdef: str
    msgcount: int = 0


class _Truncated(Exception):
    """The file ends inside a record."""


def _read_exact(handle, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise _Truncated(f'file ends {size - len(data)} bytes inside a record')
    return data


class _Scanner:
    """Sequential reader of a damaged MCAP or ROS 1 file; subclasses parse the records.

    NOTE: messages come in file order, which is time order for files that one recorder wrote
    front to back but not always (ROS 1 chunks may overlap in time).

    ``messages()`` yields ``(connection, bag time, raw bytes)`` in file order and raises
    BagReadError at the first damaged or missing record. Construction scans the file once to
    find the connections, counts and time range.
    """

    is_ros1 = False

    @staticmethod
    def for_path(path: pathlib.Path) -> Optional['_Scanner']:
        """Return a scanner for a .bag, .mcap or rosbag2 folder of MCAP files, else None."""
        if path.is_file() and path.suffix == '.bag':
            return _Ros1Scanner([path])
        if path.is_file() and path.suffix == '.mcap':
            return _McapScanner([path])
        if path.is_dir():
            files = sorted(path.glob('*.mcap'))
            return _McapScanner(files) if files else None
        return None

    def __init__(self, files: Sequence[pathlib.Path]):
        self.files = list(files)
        self.connections: Dict[object, _ScanConnection] = {}
        self.start_ns, self.end_ns = 0, 0
        self.typestore = get_typestore(Stores.EMPTY)
        first, last, count = None, None, 0
        try:
            for connection, timestamp, _ in self.messages():
                connection.msgcount += 1
                first = timestamp if first is None else min(first, timestamp)
                last = timestamp if last is None else max(last, timestamp)
                count += 1
        except BagReadError:
            if count == 0:
                raise
        self.start_ns, self.end_ns = first or 0, last or 0

    def _register(self, key, topic: str, msgtype: str, msgdef: str) -> None:
        if key in self.connections:
            return
        self.connections[key] = _ScanConnection(key, topic, msgtype, msgdef)
        if msgtype not in self.typestore.fielddefs and msgdef:
            try:
                self.typestore.register(get_types_from_msg(msgdef, msgtype))
            except Exception as error:  # noqa: B902 - rosbags raises several parser errors
                LOGGER.warning('cannot parse the definition of %s: %s', msgtype, error)

    def messages(self) -> Iterator[Tuple[_ScanConnection, int, bytes]]:
        count, last = 0, None
        for path in self.files:
            try:
                with path.open('rb') as handle:
                    for connection, timestamp, raw in self._records(handle):
                        yield connection, timestamp, raw
                        count += 1
                        last = timestamp
            # lz4 raises RuntimeError for damaged frames, bz2 raises OSError.
            except (_Truncated, ValueError, KeyError, OSError, struct.error, EOFError,
                    RuntimeError, Ros1ReaderError, Ros2ReaderError) as error:
                where = 'before the first message' if last is None else \
                    f'after {count} messages (last bag time {last} ns)'
                raise BagReadError(
                    f'bag {path} is truncated or corrupt: reading stopped {where}: {error}',
                    count, last) from error

    def _records(self, handle) -> Iterator[Tuple[_ScanConnection, int, bytes]]:
        raise NotImplementedError


class _McapScanner(_Scanner):
    """MCAP records: opcode (1 byte), length (uint64), content; chunks are decompressed."""

    def _records(self, handle):
        if handle.read(8) != b'\x89MCAP0\r\n':
            raise ValueError('not an MCAP file (invalid magic)')
        schemas: Dict[int, Tuple[str, str]] = {}
        yield from self._scan(handle, schemas, nested=False)

    def _scan(self, handle, schemas, nested: bool):
        while True:
            opcode = handle.read(1)
            if not opcode:
                if nested:
                    return
                raise _Truncated('file ends without an MCAP footer')
            (length,) = struct.unpack('<Q', _read_exact(handle, 8))
            body = _read_exact(handle, length)
            op = opcode[0]
            if op == 0x02:  # footer: the file is complete
                return
            if op == 0x03:
                schema_id, = struct.unpack_from('<H', body, 0)
                name, offset = _mcap_string(body, 2)
                _, offset = _mcap_string(body, offset)
                (size,) = struct.unpack_from('<I', body, offset)
                data = body[offset + 4:offset + 4 + size].decode()
                schemas[schema_id] = (name, data)
            elif op == 0x04:
                channel_id, schema_id = struct.unpack_from('<HH', body, 0)
                topic, _ = _mcap_string(body, 4)
                msgtype, msgdef = schemas.get(schema_id, ('', ''))
                self._register(channel_id, topic, msgtype, msgdef)
            elif op == 0x05:
                channel_id, _, log_time = struct.unpack_from('<HIQ', body, 0)
                yield self.connections[channel_id], log_time, body[22:]
            elif op == 0x06:
                _, _, size, crc = struct.unpack_from('<QQQI', body, 0)
                compression, offset = _mcap_string(body, 28)
                (compressed_size,) = struct.unpack_from('<Q', body, offset)
                compressed = body[offset + 8:offset + 8 + compressed_size]
                chunk = mcap_decompress(compressed, compression, size, crc)
                yield from self._scan(io.BytesIO(chunk), schemas, nested=True)


def _mcap_string(body: bytes, offset: int) -> Tuple[str, int]:
    (size,) = struct.unpack_from('<I', body, offset)
    return body[offset + 4:offset + 4 + size].decode(), offset + 4 + size


class _Ros1Scanner(_Scanner):
    """ROS 1 bag v2.0 records: header length, header fields, data length, data."""

    is_ros1 = True

    def _records(self, handle):
        if handle.readline() != b'#ROSBAG V2.0\n':
            raise ValueError('not a ROS 1 bag v2.0 (invalid magic)')
        yield from self._scan(handle)

    def _scan(self, handle):
        # Index records (index data, chunk info) after the chunks are skipped.
        while True:
            size_bytes = handle.read(4)
            if not size_bytes:
                return
            if len(size_bytes) < 4:
                raise _Truncated('file ends inside a record header')
            header = _ros1_fields(_read_exact(handle, struct.unpack('<I', size_bytes)[0]))
            (data_size,) = struct.unpack('<I', _read_exact(handle, 4))
            data = _read_exact(handle, data_size)
            op = header.get('op', b'\x00')[0]
            if op == 0x05:  # chunk
                compression = header['compression'].decode()
                if compression not in ros1_decompressors:
                    raise ValueError(f'unsupported chunk compression {compression!r}')
                chunk = ros1_decompressors[compression](data)
                yield from self._scan(io.BytesIO(chunk))
            elif op == 0x07:  # connection
                (conn,) = struct.unpack('<I', header['conn'])
                fields = _ros1_fields(data)
                self._register(conn, ros1_normalize_topic(header['topic'].decode()),
                               normalize_msgtype(fields['type'].decode()),
                               fields['message_definition'].decode())
            elif op == 0x02:  # message data
                (conn,) = struct.unpack('<I', header['conn'])
                sec, nsec = struct.unpack('<II', header['time'])
                yield self.connections[conn], sec * 1_000_000_000 + nsec, data


def _ros1_fields(data: bytes) -> Dict[str, bytes]:
    fields, offset = {}, 0
    while offset < len(data):
        (size,) = struct.unpack_from('<I', data, offset)
        name, _, value = data[offset + 4:offset + 4 + size].partition(b'=')
        fields[name.decode()] = value
        offset += 4 + size
    return fields


# ---------------------------------------------------------------------------------------------
# Writing


def make_header(typestore: Typestore, stamp_ns: int, frame_id: str):
    """Build a std_msgs/Header of ``typestore``."""
    time_cls = typestore.types['builtin_interfaces/msg/Time']
    header_cls = typestore.types['std_msgs/msg/Header']
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return header_cls(stamp=time_cls(sec=sec, nanosec=nanosec), frame_id=frame_id)


def make_image(typestore: Typestore, image: np.ndarray, stamp_ns: int, frame_id: str,
               encoding: str = 'rgb8'):
    """Build a sensor_msgs/Image from RGB uint8 [H, W, 3] (stored as rgb8 or bgr8)."""
    fields = rgb_to_image_fields(image, encoding)
    fields['data'] = np.frombuffer(fields['data'], np.uint8)
    return typestore.types[IMAGE_TYPE](
        header=make_header(typestore, stamp_ns, frame_id), **fields)


def make_compressed_image(typestore: Typestore, image: np.ndarray, stamp_ns: int,
                          frame_id: str, quality: int = 90):
    """Build a JPEG sensor_msgs/CompressedImage from RGB uint8 [H, W, 3]."""
    data = encode_compressed(image, 'jpeg', quality)
    return typestore.types[COMPRESSED_IMAGE_TYPE](
        header=make_header(typestore, stamp_ns, frame_id), format='jpeg',
        data=np.frombuffer(data, np.uint8))


def make_detections(typestore: Typestore, stamp_ns: int, frame_id: str, boxes: np.ndarray,
                    class_ids: Sequence[str], scores: Optional[Sequence[float]] = None):
    """Build a vision_msgs/Detection2DArray.

    ``boxes`` [N, 4] xyxy pixels become bbox centre + size; ``class_ids`` [N] are class names;
    ``scores`` [N] default to 1.0. The pose of each hypothesis is left at zero.
    """
    types = typestore.types
    header = make_header(typestore, stamp_ns, frame_id)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, np.float64)
    detections = []
    for box, class_id, score in zip(boxes, class_ids, scores):
        hypothesis = types['vision_msgs/msg/ObjectHypothesisWithPose'](
            hypothesis=types['vision_msgs/msg/ObjectHypothesis'](
                class_id=str(class_id), score=float(score)),
            pose=_zero_pose_with_covariance(typestore))
        center = types['vision_msgs/msg/Pose2D'](
            position=types['vision_msgs/msg/Point2D'](
                x=float(box[0] + box[2]) / 2.0, y=float(box[1] + box[3]) / 2.0),
            theta=0.0)
        bbox = types['vision_msgs/msg/BoundingBox2D'](
            center=center, size_x=float(box[2] - box[0]), size_y=float(box[3] - box[1]))
        detections.append(types['vision_msgs/msg/Detection2D'](
            header=header, results=[hypothesis], bbox=bbox, id=''))
    return types[DETECTIONS_TYPE](header=header, detections=detections)


def _zero_pose_with_covariance(typestore: Typestore):
    types = typestore.types
    pose = types['geometry_msgs/msg/Pose'](
        position=types['geometry_msgs/msg/Point'](x=0.0, y=0.0, z=0.0),
        orientation=types['geometry_msgs/msg/Quaternion'](x=0.0, y=0.0, z=0.0, w=1.0))
    return types['geometry_msgs/msg/PoseWithCovariance'](
        pose=pose, covariance=np.zeros(36, np.float64))


class BagWriter:
    """Write a rosbag2 atomically: to a temporary sibling folder, renamed into place on close.

    Use as a context manager. On an exception inside the ``with`` block the temporary folder is
    removed and ``path`` is left as it was. ``overwrite=True`` replaces an existing ``path``
    only after the new bag is complete.
    """

    def __init__(self, path, storage: str = 'mcap', overwrite: bool = False,
                 typestore: Optional[Typestore] = None):
        if storage not in STORAGE_PLUGINS:
            raise ValueError(
                f'unknown storage {storage!r}; allowed: {", ".join(STORAGE_PLUGINS)}')
        self.path = pathlib.Path(path)
        if self.path.exists() and not overwrite:
            raise BagError(f'output {self.path} already exists; pass --overwrite to replace it')
        self.storage = storage
        self.overwrite = overwrite
        self.typestore = typestore or get_bag_typestore()
        self.counts: collections.Counter = collections.Counter()
        self._connections: Dict[str, object] = {}
        self._tmp_dir: Optional[pathlib.Path] = None
        self._writer: Optional[Writer] = None

    def __enter__(self) -> 'BagWriter':
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_dir = pathlib.Path(tempfile.mkdtemp(
            prefix=f'.{self.path.name}.', suffix='.partial', dir=self.path.parent))
        # rosbags creates the bag folder itself and refuses an existing one.
        bag_dir = self._tmp_dir / self.path.name
        self._writer = Writer(bag_dir, version=Writer.VERSION_LATEST,
                              storage_plugin=STORAGE_PLUGINS[self.storage])
        try:
            self._writer.open()
        except (WriterError, OSError):
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            raise
        return self

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Register ``topic`` with its type (and message definition) unless already there."""
        if topic not in self._connections:
            self._connections[topic] = self._writer.add_connection(
                topic, msgtype, typestore=self.typestore)

    def write(self, topic: str, msg, timestamp_ns: int) -> None:
        """Serialize ``msg`` as CDR and write it on ``topic`` at bag time ``timestamp_ns``."""
        self.add_topic(topic, msg.__msgtype__)
        data = self.typestore.serialize_cdr(msg, msg.__msgtype__)
        self._writer.write(self._connections[topic], int(timestamp_ns), data)
        self.counts[topic] += 1

    def __exit__(self, exc_type, exc, traceback) -> bool:
        bag_dir = self._tmp_dir / self.path.name
        try:
            if exc_type is not None:
                self._abort()
                return False
            self._writer.close()
            if self.path.exists():
                # Only reached with overwrite=True; the old bag goes once the new one is whole.
                _remove(self.path)
            os.replace(bag_dir, self.path)
        except BaseException:
            self._abort()
            raise
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        return False

    def _abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.abort()
        except Exception:  # noqa: B902 - cleanup must not hide the original error
            LOGGER.debug('aborting the rosbags writer failed', exc_info=True)
        shutil.rmtree(self._tmp_dir, ignore_errors=True)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def frames_per_camera(frames: Mapping[str, int]) -> str:
    """Format ``{camera: count}`` as ``camera=count, ...`` for summaries."""
    return ', '.join(f'{camera}={count}' for camera, count in sorted(frames.items()))
