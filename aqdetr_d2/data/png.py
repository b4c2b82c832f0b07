"""A minimal PNG writer whose output bytes are the same on every machine."""
import struct
import zlib

import numpy as np

__all__ = ["encode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Largest payload of one stored (uncompressed) deflate block.
_MAX_STORED_BLOCK = 0xFFFF


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + tag
        + payload
        + struct.pack(">I", zlib.crc32(tag + payload))
    )


def _stored_zlib_stream(data: bytes) -> bytes:
    # Compressed deflate output depends on the zlib build (zlib, zlib-ng, vendored copies in
    # OpenCV / Pillow wheels), so two machines could write different PNG bytes for the same
    # pixels. Stored blocks are fully specified by RFC 1951, which makes the bytes portable;
    # CRC-32 and Adler-32 are plain checksums and do not vary.
    blocks = []
    for start in range(0, len(data), _MAX_STORED_BLOCK):
        block = data[start : start + _MAX_STORED_BLOCK]
        is_final = start + _MAX_STORED_BLOCK >= len(data)
        blocks.append(struct.pack("<BHH", is_final, len(block), len(block) ^ 0xFFFF) + block)
    # 0x78 0x01: deflate with a 32 KiB window, no preset dictionary, header checksum valid.
    return b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(data))


def encode_png(image: np.ndarray) -> bytes:
    """
    Encode an image as an uncompressed 8-bit RGB PNG.

    Args:
        image (ndarray): HxWx3 uint8 array in RGB order.

    Returns:
        bytes: the PNG file content; identical for identical pixels on any platform.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"Expected an HxWx3 uint8 image, got {image.dtype} {image.shape}.")
    height, width = image.shape[:2]
    # Every scanline starts with its filter type; 0 means "None" (raw bytes follow).
    scanlines = np.zeros((height, 1 + 3 * width), dtype=np.uint8)
    scanlines[:, 1:] = image.reshape(height, 3 * width)
    # Width, height, bit depth 8, colour type 2 (RGB), default compression/filter, no interlace.
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _stored_zlib_stream(scanlines.tobytes()))
        + _chunk(b"IEND", b"")
    )
