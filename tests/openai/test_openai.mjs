// test_openai: `stpipe serve` against the official `openai` npm client: models.list, chat
// completions non-streaming and streaming (the streamed text equals the non-streamed one for
// greedy decoding), legacy completions, and an APIError for a bad request.
// Run by run.sh from a temp dir holding node_modules/openai. Env: STP_BIN_DIR, STP_TEST_DATA.
import OpenAI from 'openai';
import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';

const bin = `${process.env.STP_BIN_DIR}/stpipe`;
const model = `${process.env.STP_TEST_DATA}/tiny-qwen-vocab-q4_0-pure.gguf`;

function startServer() {
  return new Promise((resolve, reject) => {
    const p = spawn(bin, ['serve', '--model', model, '--port', '0', '--threads', '1'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    const timer = setTimeout(() => reject(new Error(`server did not start: ${err}`)), 60000);
    p.stderr.on('data', (d) => {
      err += d;
      const m = err.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (m) {
        clearTimeout(timer);
        resolve({ proc: p, port: Number(m[1]) });
      }
    });
    p.on('exit', (code) => reject(new Error(`server exited ${code}: ${err}`)));
  });
}

let failures = 0;
async function check(name, fn) {
  try {
    await fn();
    console.log(`ok - ${name}`);
  } catch (e) {
    failures++;
    console.log(`not ok - ${name}: ${e.stack || e}`);
  }
}

const { proc, port } = await startServer();
const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: 'unused' });
const messages = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'What is the capital of France?' },
];
let plain = null;

await check('models.list', async () => {
  const list = await client.models.list();
  const ids = list.data.map((m) => m.id);
  assert.deepEqual(ids, ['tiny-qwen-vocab-q4_0-pure']);
  console.log(`  models: ${JSON.stringify(ids)}`);
});

await check('chat.completions.create (non-streaming)', async () => {
  const r = await client.chat.completions.create({
    model: 'tiny-qwen-vocab-q4_0-pure', messages, max_tokens: 16, temperature: 0,
  });
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.ok(r.choices[0].message.content.length > 0);
  assert.ok(['stop', 'length'].includes(r.choices[0].finish_reason));
  assert.ok(r.usage.prompt_tokens > 0);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  plain = r.choices[0].message.content;
  console.log(`  finish_reason=${r.choices[0].finish_reason} usage=${JSON.stringify(r.usage)}`);
  console.log(`  content=${JSON.stringify(plain)}`);
});

await check('chat.completions.create (stream: true)', async () => {
  const stream = await client.chat.completions.create({
    model: 'tiny-qwen-vocab-q4_0-pure', messages, max_tokens: 16, temperature: 0, stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let chunks = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    chunks++;
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices[0];
    if (!c) continue;
    text += c.delta?.content ?? '';
    if (c.finish_reason) finish = c.finish_reason;
  }
  assert.ok(chunks >= 3, `only ${chunks} chunks`);
  assert.equal(text, plain);
  assert.ok(['stop', 'length'].includes(finish));
  assert.ok(usage && usage.completion_tokens > 0);
  console.log(`  ${chunks} chunks, finish_reason=${finish}, text equals the non-streamed answer`);
});

await check('completions.create (legacy, with stop)', async () => {
  const r = await client.completions.create({
    model: 'tiny-qwen-vocab-q4_0-pure', prompt: 'Hello', max_tokens: 8, temperature: 0.6,
    top_p: 0.95, seed: 42, stop: ['\n\n'],
  });
  assert.equal(r.object, 'text_completion');
  assert.equal(typeof r.choices[0].text, 'string');
  console.log(`  text=${JSON.stringify(r.choices[0].text)} finish_reason=${r.choices[0].finish_reason}`);
});

await check('bad request gives an APIError 400', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: 'x', messages: [], max_tokens: 4 }),
    (e) => e instanceof OpenAI.APIError && e.status === 400 && /messages/.test(e.message),
  );
});

proc.kill('SIGTERM');
const code = await new Promise((r) => proc.on('exit', r));
await check('server exits cleanly on SIGTERM', async () => assert.equal(code, 0));
console.log(failures ? `${failures} FAILED` : 'all passed');
process.exit(failures ? 1 : 0);
