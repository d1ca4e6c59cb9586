"""The OpenAI Python SDK, unchanged, against imagegen serve's OpenAI-compatible endpoints.

Usage: serve_openai.py BASE_URL TOKEN RGBA_IMAGE.png MASK.png
(run by runtime/tests/serve_api.rs; prints "openai ok" when every check passes).
"""

import base64
import struct
import sys
import urllib.error
import urllib.request

import openai
from openai import OpenAI


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def main() -> None:
    base, token, image_path, mask_path = sys.argv[1:5]
    client = OpenAI(base_url=base, api_key=token, max_retries=0, timeout=300)

    result = client.images.generate(
        prompt="a cat", n=2, size="64x64", response_format="b64_json", user="u-1"
    )
    assert len(result.data) == 2, result
    assert isinstance(result.created, int)
    for item in result.data:
        assert png_size(base64.b64decode(item.b64_json)) == (64, 64)

    # The default answer is a URL that opens without credentials (signed, until the result
    # expires); OpenAI model names mean the served model.
    result = client.images.generate(model="dall-e-2", prompt="a dog", size="64x64")
    url = result.data[0].url
    assert url.startswith("http://"), url
    assert png_size(urllib.request.urlopen(url).read()) == (64, 64)
    tampered = url.replace("signature=", "signature=0")
    try:
        urllib.request.urlopen(tampered)
        raise SystemExit("a tampered URL was served")
    except urllib.error.HTTPError as e:
        assert e.code == 401, e.code

    # Other output formats.
    result = client.images.generate(
        prompt="a cat", size="64x64", response_format="b64_json", output_format="webp"
    )
    webp = base64.b64decode(result.data[0].b64_json)
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP", webp[:16]
    result = client.images.generate(prompt="a cat", size="64x64", output_format="jpeg")
    jpeg = urllib.request.urlopen(result.data[0].url).read()
    assert jpeg[:2] == b"\xff\xd8", jpeg[:4]

    # Edits: the mask's transparent pixels are repainted; without a mask, the image's own.
    with open(image_path, "rb") as image, open(mask_path, "rb") as mask:
        result = client.images.edit(
            image=image, mask=mask, prompt="a hat", size="64x64", response_format="b64_json"
        )
    assert len(result.data) == 1
    assert png_size(base64.b64decode(result.data[0].b64_json)) == (64, 64)
    with open(image_path, "rb") as image:
        result = client.images.edit(image=image, prompt="a hat", n=1, response_format="url")
    assert result.data[0].url.startswith("http://")

    # Errors arrive in OpenAI's shape, as the SDK's exception types.
    try:
        client.images.generate(prompt="x", size="65x64")
        raise SystemExit("a bad size was accepted")
    except openai.UnprocessableEntityError as e:
        assert e.body["param"] == "width", e.body
        assert e.body["code"] == "invalid_field", e.body
        assert e.body["type"] == "invalid_request_error", e.body
        assert e.body["message"], e.body
    try:
        client.images.generate(model="no-such-lora", prompt="x", size="64x64")
        raise SystemExit("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.body["param"] == "model", e.body
    try:
        OpenAI(base_url=base, api_key="wrong-token", max_retries=0).images.generate(prompt="x")
        raise SystemExit("a wrong token was accepted")
    except openai.AuthenticationError as e:
        assert e.body["code"] == "unauthorized", e.body
    print("openai ok")


if __name__ == "__main__":
    main()
