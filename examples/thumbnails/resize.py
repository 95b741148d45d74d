"""resize IMAGE -resize WxH OUT: a stand-in for ImageMagick's ``convert``.

Draws a WxH greyscale gradient (a PGM file) seeded by the image's name, writes it to OUT (a
relative OUT is taken inside ``$TMPDIR``, the attempt's own temporary directory, removed when the
attempt ends) and reports what it made. The image comes from argv,
where the worker expanded ``{{ item }}``; it must match the item in the inputs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zlib
from pathlib import Path

from plait_io import item, write_outputs

if len(sys.argv) != 5 or sys.argv[2] != "-resize":
    sys.exit("usage: resize.py IMAGE -resize WxH OUT")
image, size = sys.argv[1], sys.argv[3]
out = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / sys.argv[4]
if image != item():
    sys.exit(f"argv names {image!r} but the item is {item()!r}")
width, height = (int(n) for n in size.split("x"))
seed = zlib.crc32(image.encode()) % 256
pixels = bytes((seed + x + y) % 256 for y in range(height) for x in range(width))
out.parent.mkdir(parents=True, exist_ok=True)
out.write_bytes(f"P5 {width} {height} 255\n".encode() + pixels)
write_outputs({"image": image, "thumbnail": str(out), "size": size, "checksum": zlib.crc32(pixels)})
print(f"resized {image} to {size}")
