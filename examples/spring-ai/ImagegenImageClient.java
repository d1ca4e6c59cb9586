// Spring AI's OpenAI image client pointed at imagegen: the backend keeps its OpenAI code and
// changes only the base URL and the key (an imagegen tenant token). Spring AI 1.x
// (org.springframework.ai:spring-ai-openai). Not compiled by this repository's tests.
//
// With Spring Boot auto-configuration the same is two properties:
//   spring.ai.openai.image.base-url=http://sd15.images.svc
//   spring.ai.openai.image.api-key=${IMAGEGEN_TOKEN}
package com.example.imagegen;

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
    public byte[] avatar(String description, String model) {
        OpenAiImageOptions options = OpenAiImageOptions.builder()
                .model(model)
                .N(1)
                .width(512)
                .height(512)
                .responseFormat("b64_json")
                .build();
        ImageResponse response = this.model.call(new ImagePrompt(description, options));
        String b64 = response.getResult().getOutput().getB64Json();
        return Base64.getDecoder().decode(b64);
    }

    public static void main(String[] args) throws Exception {
        String baseUrl = System.getenv().getOrDefault("IMAGEGEN_URL", "http://127.0.0.1:8080");
        ImagegenImageClient client = new ImagegenImageClient(baseUrl, System.getenv("IMAGEGEN_TOKEN"));
        byte[] png = client.avatar("a friendly red fox wearing round glasses", "sd15");
        java.nio.file.Files.write(java.nio.file.Path.of("fox.png"), png);
        System.out.println("wrote fox.png (" + png.length + " bytes)");
    }
}
