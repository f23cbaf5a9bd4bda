// The official Node SDK (npm `openai`) against this server's POST /v1/moderations.
// Run by tests/test_moderations_categories.py with NODE_PATH holding the package; reads
// ICM_BASE_URL, ICM_API_KEY, ICM_RED and ICM_BLUE (data: URLs of a red and a blue PNG) and
// prints one JSON object of what the SDK read.
const OpenAI = require("openai");

const CATEGORIES = [
  "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
  "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
  "violence/graphic",
];

function describe(err) {
  return {
    status: err.status, type: err.type, code: err.code, param: err.param,
    is_bad_request: err instanceof OpenAI.BadRequestError,
  };
}

async function main() {
  const env = process.env;
  const client = new OpenAI({ baseURL: env.ICM_BASE_URL, apiKey: env.ICM_API_KEY, maxRetries: 0 });
  const part = (url) => ({ type: "image_url", image_url: { url } });
  const out = { sdk_version: require("openai/version").VERSION };

  // one input of two images (and a text part, not judged): one result, the worst image decides
  const resp = await client.moderations.create({
    model: "icm-sexy:children",
    input: [{ type: "text", text: "a caption" }, part(env.ICM_BLUE), part(env.ICM_RED)],
  });
  const r = resp.results[0];
  out.results = resp.results.length;
  out.flagged = r.flagged;
  out.sexual = r.categories.sexual;
  out.sexual_applied = r.category_applied_input_types.sexual;
  out.self_harm_applied = r.category_applied_input_types["self-harm"];
  out.violence_graphic = r.categories["violence/graphic"];
  out.violence_graphic_score = r.category_scores["violence/graphic"];
  out.n_categories = CATEGORIES.filter(
    (c) => c in r.categories && c in r.category_scores && c in r.category_applied_input_types
  ).length;
  out.types = [...new Set(CATEGORIES.map((c) => [
    typeof r.categories[c], typeof r.category_scores[c],
    Array.isArray(r.category_applied_input_types[c]) ? "object" : "not-an-array",
  ].join(" ")))];

  // a list of strings: one result per string
  const two = await client.moderations.create({ input: [env.ICM_BLUE, env.ICM_BLUE] });
  out.strings = two.results.length;

  try {
    await client.moderations.create({ model: "icm-sexy", input: "I want to hurt them." });
    out.text_error = "no error";
  } catch (err) {
    out.text_error = describe(err);
    delete out.text_error.param;
  }
  try {
    await client.moderations.create({ input: [part("data:image/png;base64,bm90IGFuIGltYWdl")] });
    out.bad_image_error = "no error";
  } catch (err) {
    out.bad_image_error = describe(err);
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err));
  process.exit(1);
});
