// Spring AI's OpenAI image model pointed at imagegen: the backend keeps its OpenAI code and
// changes only the base URL and the key (an imagegen tenant token). Spring AI 1.1
// (org.springframework.ai:spring-ai-openai), Java 17.
//
// With Spring Boot auto-configuration the same is two properties:
//   spring.ai.openai.image.base-url=http://sd15.images.svc
//   spring.ai.openai.image.api-key=${IMAGEGEN_TOKEN}
//
// Run against a service: IMAGEGEN_URL, IMAGEGEN_TOKEN, and optionally IMAGEGEN_MODEL (the
// served model, a tenant's LoRA, or an OpenAI model name), IMAGEGEN_SIZE (pixels, default
// 512) and IMAGEGEN_OUT (default fox.png). It checks what it gets and exits non-zero on a
// wrong answer.
package com.example.imagegen;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Base64;

import org.springframework.ai.image.ImagePrompt;
import org.springframework.ai.image.ImageResponse;
import org.springframework.ai.openai.OpenAiImageModel;
import org.springframework.ai.openai.OpenAiImageOptions;
import org.springframework.ai.openai.api.OpenAiImageApi;

public final class ImagegenImageClient {

    private final OpenAiImageModel model;

    /**
     * @param baseUrl the runtime's Service, e.g. {@code http://sd15.images.svc} in the cluster
     *     (the client appends {@code /v1/images/generations})
     * @param token a tenant token the runtime accepts
     */
    public ImagegenImageClient(String baseUrl, String token) {
        OpenAiImageApi api = OpenAiImageApi.builder().baseUrl(baseUrl).apiKey(token).build();
        this.model = new OpenAiImageModel(api);
    }

    /** An avatar as PNG bytes. {@code model} is the base model or a LoRA of the tenant. */
    public byte[] avatar(String description, String model, int size) {
        OpenAiImageOptions options = OpenAiImageOptions.builder()
                .model(model)
                .N(1)
                .width(size)
                .height(size)
                .responseFormat("b64_json")
                .build();
        ImageResponse response = this.model.call(new ImagePrompt(description, options));
        String b64 = response.getResult().getOutput().getB64Json();
        return Base64.getDecoder().decode(b64);
    }

    /** The width and height a PNG's header gives. */
    static int[] pngSize(byte[] png) {
        byte[] signature = {(byte) 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
        for (int i = 0; i < signature.length; i++) {
            if (png.length < 24 || png[i] != signature[i]) {
                throw new IllegalStateException("not a PNG");
            }
        }
        java.nio.ByteBuffer header = java.nio.ByteBuffer.wrap(png, 16, 8);
        return new int[] {header.getInt(), header.getInt()};
    }

    public static void main(String[] args) throws Exception {
        String baseUrl = System.getenv().getOrDefault("IMAGEGEN_URL", "http://127.0.0.1:8080");
        String model = System.getenv().getOrDefault("IMAGEGEN_MODEL", "sd15");
        int size = Integer.parseInt(System.getenv().getOrDefault("IMAGEGEN_SIZE", "512"));
        Path out = Path.of(System.getenv().getOrDefault("IMAGEGEN_OUT", "fox.png"));
        ImagegenImageClient client = new ImagegenImageClient(baseUrl, System.getenv("IMAGEGEN_TOKEN"));
        byte[] png = client.avatar("a friendly red fox wearing round glasses", model, size);
        int[] dimensions = pngSize(png);
        if (dimensions[0] != size || dimensions[1] != size) {
            throw new IllegalStateException(
                    "asked for " + size + "x" + size + ", got " + dimensions[0] + "x" + dimensions[1]);
        }
        Files.write(out, png);
        System.out.println("spring-ai ok: wrote " + out + " (" + png.length + " bytes, "
                + dimensions[0] + "x" + dimensions[1] + ")");
    }
}
