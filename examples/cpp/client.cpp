// latentrt_client: one text-to-image request to a model served by `latentrt serve` (Triton, KServe v2 HTTP).
//
//   latentrt_client --url http://127.0.0.1:8000 --model latentrt --prompt "a large red circle on the left"
//                   [--negative-prompt TEXT] [--seed N] [--steps N] [--guidance G] [--height H] [--width W] -o out.ppm
//
// The request is JSON; the image comes back as raw bytes after the JSON header (Triton's binary tensor
// extension: the `Inference-Header-Content-Length` response header gives the JSON's length), and is
// written as a binary PPM (P6). The server-side timings (the `timings` output, JSON) and the round
// trip are printed. Exit codes: 0 ok, 1 transport or protocol error, 2 the server refused the request.

#include <curl/curl.h>

#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

using nlohmann::json;

namespace {

struct Options {
  std::string url = "http://127.0.0.1:8000";
  std::string model = "latentrt";
  std::string prompt;
  std::optional<std::string> negative_prompt;
  std::optional<int64_t> seed;
  std::optional<int32_t> steps, height, width;
  std::optional<float> guidance;
  std::string output = "out.ppm";
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "error: " << problem << "\n"
            << "usage: latentrt_client --prompt TEXT [--url URL] [--model NAME] [--negative-prompt TEXT] [--seed N]\n"
            << "                       [--steps N] [--guidance G] [--height H] [--width W] [-o OUT.ppm]\n";
  std::exit(1);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) usage("missing value after " + flag);
    std::string value = argv[++i];
    try {
      if (flag == "--url") o.url = value;
      else if (flag == "--model") o.model = value;
      else if (flag == "--prompt" || flag == "-p") o.prompt = value;
      else if (flag == "--negative-prompt") o.negative_prompt = value;
      else if (flag == "--seed") o.seed = std::stoll(value);
      else if (flag == "--steps") o.steps = std::stoi(value);
      else if (flag == "--guidance") o.guidance = std::stof(value);
      else if (flag == "--height") o.height = std::stoi(value);
      else if (flag == "--width") o.width = std::stoi(value);
      else if (flag == "-o" || flag == "--output") o.output = value;
      else usage("unknown option " + flag);
    } catch (const std::logic_error&) {
      usage("bad value for " + flag + ": " + value);
    }
  }
  if (o.prompt.empty()) usage("--prompt is required");
  return o;
}

template <typename T>
json tensor(const std::string& name, const std::string& datatype, const T& value) {
  return {{"name", name}, {"datatype", datatype}, {"shape", {1, 1}}, {"data", {value}}};
}

json request_body(const Options& o) {
  json inputs = json::array({tensor("prompt", "BYTES", o.prompt)});
  if (o.negative_prompt) inputs.push_back(tensor("negative_prompt", "BYTES", *o.negative_prompt));
  if (o.seed) inputs.push_back(tensor("seed", "INT64", *o.seed));
  if (o.steps) inputs.push_back(tensor("num_inference_steps", "INT32", *o.steps));
  if (o.guidance) inputs.push_back(tensor("guidance_scale", "FP32", *o.guidance));
  if (o.height) inputs.push_back(tensor("height", "INT32", *o.height));
  if (o.width) inputs.push_back(tensor("width", "INT32", *o.width));
  json outputs = json::array({
      {{"name", "image"}, {"parameters", {{"binary_data", true}}}},
      {{"name", "timings"}, {"parameters", {{"binary_data", false}}}},
  });
  return {{"inputs", inputs}, {"outputs", outputs}};
}

struct Response {
  long status = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
};

size_t on_body(char* data, size_t size, size_t count, void* out) {
  static_cast<std::string*>(out)->append(data, size * count);
  return size * count;
}

size_t on_header(char* data, size_t size, size_t count, void* out) {
  std::string line(data, size * count);
  auto colon = line.find(':');
  if (colon != std::string::npos) {
    std::string name = line.substr(0, colon);
    for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    std::string value = line.substr(colon + 1);
    value.erase(0, value.find_first_not_of(" \t"));
    value.erase(value.find_last_not_of(" \t\r\n") + 1);
    (*static_cast<std::map<std::string, std::string>*>(out))[name] = value;
  }
  return size * count;
}

Response post(const std::string& url, const std::string& body) {
  CURL* curl = curl_easy_init();
  if (!curl) throw std::runtime_error("curl_easy_init failed");
  Response r;
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.data());
  curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &r.body);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &r.headers);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 600L);
  CURLcode code = curl_easy_perform(curl);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &r.status);
  curl_slist_free_all(headers);
  curl_easy_cleanup(curl);
  if (code != CURLE_OK) throw std::runtime_error(std::string("request to ") + url + " failed: " + curl_easy_strerror(code));
  return r;
}

void write_ppm(const std::string& path, const uint8_t* pixels, int64_t height, int64_t width) {
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path);
  f << "P6\n" << width << " " << height << "\n255\n";
  f.write(reinterpret_cast<const char*>(pixels), height * width * 3);
  if (!f) throw std::runtime_error("failed writing " + path);
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  curl_global_init(CURL_GLOBAL_DEFAULT);
  try {
    std::string url = o.url + "/v2/models/" + o.model + "/infer";
    auto start = std::chrono::steady_clock::now();
    Response r = post(url, request_body(o).dump());
    double round_trip_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    // The JSON header, then the binary outputs in the order the header lists them.
    size_t header_length = r.body.size();
    if (auto it = r.headers.find("inference-header-content-length"); it != r.headers.end()) header_length = std::stoul(it->second);
    if (header_length > r.body.size()) throw std::runtime_error("response shorter than its JSON header");
    json header = json::parse(r.body.substr(0, header_length));
    if (r.status != 200) {
      std::cerr << "error: the server answered " << r.status << ": " << header.value("error", r.body) << "\n";
      curl_global_cleanup();
      return 2;
    }
    size_t offset = header_length;
    const uint8_t* image = nullptr;
    std::vector<int64_t> shape;
    json timings;
    for (const auto& out : header.at("outputs")) {
      size_t binary = out.contains("parameters") ? out["parameters"].value("binary_data_size", size_t{0}) : 0;
      if (out.at("name") == "image") {
        shape = out.at("shape").get<std::vector<int64_t>>();
        if (shape.size() != 4 || shape[3] != 3 || binary != static_cast<size_t>(shape[0] * shape[1] * shape[2] * 3))
          throw std::runtime_error("unexpected image tensor: " + out.dump());
        image = reinterpret_cast<const uint8_t*>(r.body.data() + offset);
      } else if (out.at("name") == "timings" && binary == 0) {
        timings = json::parse(out.at("data").at(0).get<std::string>());
      }
      offset += binary;
    }
    if (!image || offset > r.body.size()) throw std::runtime_error("the response has no complete image output");
    write_ppm(o.output, image, shape[1], shape[2]);

    std::cout << "wrote " << o.output << " (" << shape[2] << "x" << shape[1] << ")\n";
    std::cout << "seed " << timings.value("seed", int64_t{-1}) << ", " << timings.value("num_inference_steps", 0)
              << " steps, batch of " << timings.value("batch_size", 0) << " on the server\n";
    for (const char* key : {"text_encoding_ms", "denoising_ms", "vae_decode_ms", "pipeline_ms"})
      std::cout << "  " << key << ": " << timings.value(key, 0.0) << "\n";
    std::cout << "  round_trip_ms: " << round_trip_ms << "\n";
  } catch (const std::exception& err) {
    std::cerr << "error: " << err.what() << "\n";
    curl_global_cleanup();
    return 1;
  }
  curl_global_cleanup();
  return 0;
}
