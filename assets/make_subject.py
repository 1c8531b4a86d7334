"""Draws the bundled example subject: one made-up object (a red mug with a yellow star) in five photos.

Different poses, backgrounds and aspect ratios, drawn from a fixed seed; no third-party images.
Run: python assets/make_subject.py  (rewrites assets/subject/*.jpg and the caption beside one of them)
"""

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent / "subject"
SHOTS = [  # (width, height, background, angle, scale, centre x, centre y)
    (512, 512, "sky", 0, 0.55, 0.5, 0.55),
    (640, 480, "stripes", -12, 0.5, 0.42, 0.55),
    (480, 640, "checker", 8, 0.45, 0.5, 0.6),
    (576, 448, "wood", 20, 0.55, 0.6, 0.5),
    (448, 576, "grass", -25, 0.5, 0.45, 0.5),
]


def background(kind, size, rng):
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    if kind == "sky":
        for y in range(height):
            t = y / height
            draw.line([(0, y), (width, y)], fill=(int(120 + 100 * t), int(170 + 60 * t), 235))
    elif kind == "stripes":
        for x in range(-height, width, 40):
            draw.polygon([(x, 0), (x + 20, 0), (x + 20 + height, height), (x + height, height)], fill=(40, 90, 160))
        draw.rectangle([0, 0, width, height], outline=None)
        image = Image.blend(Image.new("RGB", size, (230, 230, 220)), image, 0.6)
    elif kind == "checker":
        for y in range(0, height, 48):
            for x in range(0, width, 48):
                shade = 200 if (x // 48 + y // 48) % 2 else 90
                draw.rectangle([x, y, x + 47, y + 47], fill=(shade, shade, shade - 20))
    elif kind == "wood":
        for y in range(height):
            wave = 15 * math.sin(y / 9 + rng.random() * 0.3)
            draw.line([(0, y), (width, y)], fill=(int(150 + wave), int(100 + wave / 2), 60))
    else:
        image.paste((70, 140, 60), [0, 0, width, height])
        for _ in range(2500):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.line([(x, y), (x + rng.randint(-3, 3), y - rng.randint(4, 12))], fill=(40, rng.randint(110, 190), 40))
    return image


def mug(size):
    """The subject on a transparent layer: a red mug, white rim, handle, yellow star."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    body = [size * 0.2, size * 0.2, size * 0.72, size * 0.9]
    draw.ellipse([size * 0.62, size * 0.35, size * 0.92, size * 0.72], outline=(170, 20, 30), width=int(size * 0.06))
    draw.rounded_rectangle(body, radius=int(size * 0.06), fill=(200, 30, 40))
    draw.ellipse([size * 0.2, size * 0.14, size * 0.72, size * 0.28], fill=(245, 245, 240))
    draw.ellipse([size * 0.24, size * 0.16, size * 0.68, size * 0.26], fill=(60, 30, 20))
    cx, cy, outer = size * 0.46, size * 0.56, size * 0.16
    points = [
        (cx + (outer if i % 2 == 0 else outer * 0.45) * math.sin(i * math.pi / 5),
         cy - (outer if i % 2 == 0 else outer * 0.45) * math.cos(i * math.pi / 5))
        for i in range(10)
    ]
    draw.polygon(points, fill=(250, 210, 40))
    return layer


def shot(width, height, kind, angle, scale, cx, cy, rng):
    image = background(kind, (width, height), rng)
    side = int(min(width, height) * scale)
    subject = mug(side).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    shadow = Image.new("RGBA", subject.size, (0, 0, 0, 0))
    shadow.putalpha(subject.getchannel("A").point(lambda a: a // 3))
    shadow = shadow.filter(ImageFilter.GaussianBlur(side // 25))
    x, y = int(cx * width - subject.width / 2), int(cy * height - subject.height / 2)
    image.paste(shadow, (x + side // 20, y + side // 20), shadow)
    image.paste(subject, (x, y), subject)
    return image


def main():
    rng = random.Random(0)
    HERE.mkdir(exist_ok=True)
    for index, params in enumerate(SHOTS):
        shot(*params, rng).save(HERE / f"{index:02d}.jpg", quality=90)
    (HERE / "03.txt").write_text("a photo of sks mug on a wooden table\n")


if __name__ == "__main__":
    main()
