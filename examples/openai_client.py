"""The `openai` Python SDK against imagegen's OpenAI-compatible endpoints, unchanged but for
`base_url`: images.generate and images.edit.

    pip install openai
    IMAGEGEN_URL=http://127.0.0.1:8080 IMAGEGEN_TOKEN=... python examples/openai_client.py photo.png

The token is an imagegen tenant token (the SDK sends it as `Authorization: Bearer`). `model`
names the served base model or one of the tenant's LoRAs. Not run by the test suite: the
runtime's own tests drive the same SDK against the real binary.
"""

import base64
import os
import sys

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("IMAGEGEN_URL", "http://127.0.0.1:8080").rstrip("/") + "/v1",
    api_key=os.environ["IMAGEGEN_TOKEN"],
)

# Text to image, returned inline.
result = client.images.generate(
    prompt="a friendly red fox wearing round glasses, head and shoulders",
    n=2,
    size="512x512",
    response_format="b64_json",
)
for i, image in enumerate(result.data):
    with open(f"fox-{i}.png", "wb") as f:
        f.write(base64.b64decode(image.b64_json))
    print(f"wrote fox-{i}.png")

# The same, as URLs on the runtime (fetch them with the same bearer token).
result = client.images.generate(prompt="a paper boat on a pond", response_format="url")
print("url:", result.data[0].url)

# Edit: where the mask is transparent, the image is repainted (OpenAI's convention).
if len(sys.argv) > 1:
    photo = sys.argv[1]
    mask = sys.argv[2] if len(sys.argv) > 2 else photo
    with open(photo, "rb") as image, open(mask, "rb") as mask_file:
        edited = client.images.edit(
            image=image,
            mask=mask_file,
            prompt="a green knitted sweater",
            n=1,
            size="512x512",
            response_format="b64_json",
        )
    with open("edited.png", "wb") as f:
        f.write(base64.b64decode(edited.data[0].b64_json))
    print("wrote edited.png")
