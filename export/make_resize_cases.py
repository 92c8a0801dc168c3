"""Write the PIL resize and decode reference cases for tests/preprocess.rs.

Run with the project venv (Pillow 13.0.0, transformers 5.23.0):

    .venv/bin/python export/make_resize_cases.py

Outputs tests/fixtures/resize/: small seeded random RGB inputs, their
`Image.resize(size, resample)` outputs for every filter (upscale, downscale,
mixed, one axis only, to 1 px, odd sizes), and decode cases (images in many
formats and pixel layouts with the RGB array transformers' `convert_to_rgb`
makes of them; for images with an EXIF orientation, of the upright image that
transformers' `load_image` makes with `ImageOps.exif_transpose`), all listed in
cases.json. Everything is PNG so the expected
pixels are stored losslessly; the same seed always gives the same files.

It first checks that this Pillow still orders its two resampling passes the
way src/preprocess/resize.rs assumes, and stops if not.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "resize"
FILTERS = ["NEAREST", "BOX", "BILINEAR", "HAMMING", "BICUBIC", "LANCZOS"]

# input name -> (width, height); sizes chosen odd and prime-ish on purpose.
INPUTS = {"a": (37, 23), "b": (1, 1), "c": (8, 5), "d": (71, 59)}

# (input, output width, output height, what it exercises)
RESIZES = [
    ("a", 64, 41, "upscale both axes"),
    ("a", 13, 7, "downscale both axes"),
    ("a", 61, 11, "up in x, down in y"),
    ("a", 37, 40, "vertical pass only"),
    ("a", 20, 23, "horizontal pass only"),
    # Pillow 13 runs the vertical pass first when the height loses more than twice as many
    # pixels as the width; the two orders round differently.
    ("a", 33, 15, "both shrink, height by exactly twice the width's loss: horizontal first"),
    ("a", 34, 15, "both shrink, height by more than twice the width's loss: vertical first"),
    ("d", 60, 20, "both shrink, mostly in height: vertical first"),
    ("a", 1, 1, "to one pixel"),
    ("a", 1, 30, "to one column"),
    ("b", 5, 4, "from one pixel"),
    ("c", 90, 57, "large upscale factor"),
    ("d", 5, 3, "large downscale factor"),
    ("d", 40, 40, "downscale to square"),
]


def random_rgb(name: str, size: tuple[int, int]) -> Image.Image:
    seed = sum(ord(ch) for ch in name)
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def write_resize_cases() -> list[dict]:
    images = {}
    for name, size in INPUTS.items():
        images[name] = random_rgb(name, size)
        images[name].save(OUT / f"in_{name}.png")
    cases = []
    for filt in FILTERS:
        resample = Image.Resampling[filt]
        for src, w, h, why in RESIZES:
            out_name = f"out_{src}_{w}x{h}_{filt.lower()}.png"
            images[src].resize((w, h), resample).save(OUT / out_name)
            cases.append(
                {"input": f"in_{src}.png", "output": out_name, "filter": filt, "width": w, "height": h, "why": why}
            )
    return cases


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """The pass order src/preprocess/resize.rs assumes Pillow uses (not documented by Pillow)."""
    lost_rows = in_size[1] - out_size[1]
    return lost_rows > 0 and lost_rows > 2 * (in_size[0] - out_size[0])


def check_pass_order(trials: int = 300) -> None:
    """Fail loudly if this Pillow orders its two passes differently from `vertical_first`.

    Each order is rebuilt from two one-axis resizes (each a single pass); `Image.resize` must
    equal the one the rule picks and, on random pixels, differ from the other.
    """
    rng = np.random.default_rng(11)
    for _ in range(trials):
        iw, ih, ow, oh = (int(v) for v in rng.integers(1, 80, 4))
        if iw == ow or ih == oh:
            continue
        image = Image.fromarray(rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8), "RGB")
        lanczos = Image.Resampling.LANCZOS
        direct = np.asarray(image.resize((ow, oh), lanczos))
        horizontal = np.asarray(image.resize((ow, ih), lanczos).resize((ow, oh), lanczos))
        vertical = np.asarray(image.resize((iw, oh), lanczos).resize((ow, oh), lanczos))
        if np.array_equal(horizontal, vertical):
            continue
        picked = vertical if vertical_first((iw, ih), (ow, oh)) else horizontal
        if not np.array_equal(direct, picked):
            raise SystemExit(f"Pillow's pass order changed: {iw}x{ih} -> {ow}x{oh}; update resize.rs")


def png_bytes(width: int, height: int, color_type: int, bit_depth: int, rows: list[bytes], extra=()) -> bytes:
    """A minimal PNG written by hand, for layouts PIL will not save (16-bit RGB, 2-bit gray...)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    body = chunk(b"IHDR", ihdr) + b"".join(chunk(k, d) for k, d in extra)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def with_orientation(image: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return saved(image, fmt, exif=exif, **kwargs)


def decode_sources() -> dict[str, tuple[bytes, bool]]:
    """file name -> (encoded bytes, whether our decoder must match PIL exactly)."""
    rng = np.random.default_rng(7)
    w, h = 19, 13
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    u16 = lambda *shape: rng.integers(0, 65536, shape, dtype=np.uint16)  # noqa: E731
    rgb = Image.fromarray(u8(h, w, 3), "RGB")
    # Alpha covering 0, 255 and everything between, so compositing onto white is exercised.
    alpha = u8(h, w)
    alpha[0, :4] = [0, 255, 1, 254]
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")
    gray = Image.fromarray(u8(h, w), "L")
    gray16 = u16(h, w)
    gray16[0, :4] = [0, 255, 256, 65535]  # PIL clips I;16 to 255 when converting to RGB
    palette = rgb.quantize(colors=16)
    # A smooth picture for the lossy codecs, whose errors on noise say little.
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.dstack([xx * 4, yy * 5, (xx + yy) * 2]).astype(np.uint8)
    photo = Image.fromarray(smooth, "RGB")
    gif_pal = Image.fromarray(u8(h, w) % 8, "P")
    gif_pal.putpalette(list(u8(8 * 3)))
    return {
        "rgb8.png": (saved(rgb, "PNG"), True),
        "rgba8.png": (saved(rgba, "PNG"), True),
        "gray8.png": (saved(gray, "PNG"), True),
        "gray_alpha8.png": (saved(Image.merge("LA", [gray, Image.fromarray(alpha)]), "PNG"), True),
        "palette.png": (saved(palette, "PNG"), True),
        "palette_trns.png": (saved(palette, "PNG", transparency=3), True),
        "rgb_trns.png": (saved(rgb, "PNG", transparency=tuple(int(v) for v in np.asarray(rgb)[1, 1])), True),
        "gray1.png": (saved(gray.convert("1"), "PNG"), True),
        "gray4.png": (png_bytes(w, h, 0, 4, [bytes(u8((w + 1) // 2)) for _ in range(h)]), True),
        "gray16.png": (png_bytes(w, h, 0, 16, [row.astype(">u2").tobytes() for row in gray16]), True),
        "rgb16.png": (png_bytes(w, h, 2, 16, [u16(w * 3).astype(">u2").tobytes() for _ in range(h)]), True),
        "rgba16.png": (png_bytes(w, h, 6, 16, [u16(w * 4).astype(">u2").tobytes() for _ in range(h)]), True),
        "gray_alpha16.png": (png_bytes(w, h, 4, 16, [u16(w * 2).astype(">u2").tobytes() for _ in range(h)]), True),
        "rgb.bmp": (saved(rgb, "BMP"), True),
        "palette.bmp": (saved(palette, "BMP"), True),
        "gray.bmp": (saved(gray, "BMP"), True),
        "palette.gif": (saved(gif_pal, "GIF"), True),
        "transparent.gif": (saved(gif_pal, "GIF", transparency=2), True),
        "lossless.webp": (saved(rgb, "WEBP", lossless=True), True),
        "lossless_alpha.webp": (saved(rgba, "WEBP", lossless=True, exact=True), True),
        "lossy.webp": (saved(photo, "WEBP", quality=80), False),
        "color420.jpg": (saved(photo, "JPEG", quality=90), False),
        "color444.jpg": (saved(photo, "JPEG", quality=90, subsampling=0), False),
        "gray.jpg": (saved(photo.convert("L"), "JPEG", quality=90), False),
        # Phones store pictures sideways and say how to turn them: every EXIF orientation.
        **{f"orientation{o}.png": (with_orientation(rgb, "PNG", o), True) for o in range(1, 9)},
        "orientation6.jpg": (with_orientation(photo, "JPEG", 6, quality=90), False),
        "orientation3.webp": (with_orientation(rgb, "WEBP", 3, lossless=True), True),
    }


def write_decode_cases() -> list[dict]:
    folder = OUT / "decode"
    folder.mkdir(exist_ok=True)
    cases = []
    for name, (data, exact) in decode_sources().items():
        (folder / name).write_bytes(data)
        # What Idefics3ImageProcessorPil sees: PIL.Image.open, turned upright as load_image
        # does (a no-op without an EXIF orientation), then convert_to_rgb.
        expected = convert_to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), return_numpy=True)
        expected_name = name.replace(".", "_") + ".rgb.png"
        Image.fromarray(expected, "RGB").save(folder / expected_name)
        cases.append({"file": f"decode/{name}", "expected": f"decode/{expected_name}", "exact": exact})
    return cases


def main() -> None:
    check_pass_order()
    OUT.mkdir(parents=True, exist_ok=True)
    cases = {"pillow": Image.__version__, "resize": write_resize_cases(), "decode": write_decode_cases()}
    # One case per line: readable in a diff, a fraction of indent=1's size.
    lines = [
        f' "{key}": [\n  ' + ",\n  ".join(json.dumps(c) for c in cases[key]) + "\n ]" for key in ("resize", "decode")
    ]
    text = "{\n" + f' "pillow": {json.dumps(cases["pillow"])},\n' + ",\n".join(lines) + "\n}\n"
    (OUT / "cases.json").write_text(text)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(cases['resize'])} resize and {len(cases['decode'])} decode cases, {total} bytes")


if __name__ == "__main__":
    main()
