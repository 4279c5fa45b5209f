"""Convert sensor_msgs Image and CompressedImage messages to RGB numpy arrays and back.

Works on rclpy messages and on rosbags' message classes alike (both have the same fields).
Decoding goes through ``rosbags.image``. That library assumes tightly packed rows, a complete
buffer and decodable compressed data, so this module checks those first. A malformed frame then
raises ``ImageError`` with the reason instead of crashing or reading garbage.
"""

from types import SimpleNamespace

import cv2
import numpy as np
from rosbags.image import image as rosbags_image

SUPPORTED_ENCODINGS = (
    'rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16',
    'bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8',
)
_BYTES_PER_PIXEL = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2}
MAX_SIDE = 16384  # pixels; larger headers are treated as corrupt, not allocated


class ImageError(ValueError):
    """Error for a frame that cannot be decoded; the message gives the reason."""


def _buffer(data) -> memoryview:
    # rclpy gives array.array('B') or bytes, rosbags gives a numpy uint8 array.
    return memoryview(data).cast('B')


def raw_to_rgb(msg) -> np.ndarray:
    """Decode a sensor_msgs/Image into RGB uint8 [H, W, 3]; raises ImageError."""
    encoding = msg.encoding
    if encoding not in SUPPORTED_ENCODINGS:
        raise ImageError(
            f'unsupported encoding {encoding!r}; supported: {", ".join(SUPPORTED_ENCODINGS)}')
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageError(f'zero-size image {width}x{height}')
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ImageError(f'image size {width}x{height} exceeds {MAX_SIDE} pixels a side')
    row_bytes = width * _BYTES_PER_PIXEL.get(encoding, 1)
    if step < row_bytes:
        raise ImageError(
            f'step {step} is smaller than width * bytes per pixel = {row_bytes} for {encoding}')
    data = _buffer(msg.data)
    if len(data) < step * height:
        raise ImageError(
            f'data has {len(data)} bytes, expected step * height = {step * height}')

    # rosbags.image assumes tightly packed rows, so drop any row padding first.
    rows = np.frombuffer(data, np.uint8, count=step * height).reshape(height, step)
    packed = np.ascontiguousarray(rows[:, :row_bytes])
    view = SimpleNamespace(
        encoding=encoding, height=height, width=width, step=row_bytes,
        is_bigendian=int(msg.is_bigendian), data=packed.reshape(-1))
    try:
        image = rosbags_image.image_to_cvimage(view, 'rgb8')
    except (rosbags_image.ImageFormatError, rosbags_image.ImageConversionError,
            cv2.error) as error:
        raise ImageError(f'cannot convert {encoding} to rgb8: {error}') from error
    return np.ascontiguousarray(image)


def compressed_to_rgb(msg) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) into RGB uint8 [H, W, 3]."""
    data = _buffer(msg.data)
    if len(data) == 0:
        raise ImageError(f'empty compressed data (format {msg.format!r})')
    array = np.frombuffer(data, np.uint8)
    # rosbags asserts on a failed decode, so check decodability here with the same call.
    decoded = cv2.imdecode(array, cv2.IMREAD_ANYCOLOR)
    if decoded is None:
        raise ImageError(f'undecodable compressed data ({len(data)} bytes, format '
                         f'{msg.format!r}); JPEG and PNG are supported')
    if decoded.ndim == 2:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_GRAY2BGR)
    elif decoded.shape[2] == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2BGR)
    if decoded.dtype != np.uint8:
        decoded = (decoded / 257).astype(np.uint8)
    return np.ascontiguousarray(rosbags_image.convert_color(decoded, 'bgr8', 'rgb8'))


def message_to_rgb(msg) -> np.ndarray:
    """Decode either image message type into RGB uint8 [H, W, 3]; raises ImageError."""
    if hasattr(msg, 'format'):
        return compressed_to_rgb(msg)
    return raw_to_rgb(msg)


def rgb_to_image_fields(image: np.ndarray, encoding: str = 'rgb8') -> dict:
    """Return the fields of a sensor_msgs/Image holding ``image`` (RGB uint8 [H, W, 3]).

    ``encoding`` may be 'rgb8' or 'bgr8'. The caller sets the header.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'expected RGB uint8 [H, W, 3], got {image.dtype} {image.shape}')
    if encoding == 'bgr8':
        image = image[:, :, ::-1]
    elif encoding != 'rgb8':
        raise ValueError(f"encoding must be 'rgb8' or 'bgr8', got {encoding!r}")
    height, width = image.shape[:2]
    return {
        'height': height, 'width': width, 'encoding': encoding, 'is_bigendian': 0,
        'step': width * 3, 'data': np.ascontiguousarray(image).tobytes(),
    }


def encode_compressed(image: np.ndarray, image_format: str = 'jpeg', quality: int = 90) -> bytes:
    """Encode RGB uint8 [H, W, 3] as JPEG or PNG bytes for a CompressedImage."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image_format == 'jpeg':
        ok, encoded = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif image_format == 'png':
        ok, encoded = cv2.imencode('.png', bgr)
    else:
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    if not ok:
        raise ImageError(f'OpenCV failed to encode a {image.shape} image as {image_format}')
    return encoded.tobytes()
