// The static-context (web) SDK and OFREP provider, in Node: bulk evaluation, then polling with ETags.
// Reads {baseUrl, headers, pollMs, waitMs, contexts, cases: [{flag, type, default}]} on stdin; prints, per
// context, one result per case as JSON. After the first context it waits `waitMs` so the provider polls.
import { OpenFeature } from '@openfeature/web-sdk';
import { OFREPWebProvider } from '@openfeature/ofrep-web-provider';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const { baseUrl, headers, pollMs, waitMs, contexts, cases } = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const getters = {
  boolean: 'getBooleanDetails',
  string: 'getStringDetails',
  number: 'getNumberDetails',
  object: 'getObjectDetails',
};

await OpenFeature.setContext(contexts[0]);
const provider = new OFREPWebProvider({
  baseUrl,
  headers: Object.entries(headers),
  pollInterval: pollMs,
  changeDetection: 'polling',
  cacheMode: 'disabled', // no localStorage in Node
  disableVisibilityRefresh: true,
});
await OpenFeature.setProviderAndWait(provider);
const client = OpenFeature.getClient();

const results = [];
for (const [index, context] of contexts.entries()) {
  if (index > 0) await OpenFeature.setContext(context);
  results.push(
    cases.map(({ flag, type, default: fallback }) => {
      const details = client[getters[type]](flag, fallback);
      return { value: details.value, reason: details.reason, errorCode: details.errorCode ?? null };
    }),
  );
  if (index === 0) await new Promise((resolve) => setTimeout(resolve, waitMs));
}
await OpenFeature.close();
process.stdout.write(JSON.stringify(results));
