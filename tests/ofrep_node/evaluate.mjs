// Reads {baseUrl, groups: [{headers, cases: [{flag, type, default, context}]}]} on stdin, evaluates every
// case with the official OpenFeature server SDK and OFREP provider, prints one result per case as JSON.
import { OpenFeature } from '@openfeature/server-sdk';
import { OFREPProvider } from '@openfeature/ofrep-provider';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const { baseUrl, groups } = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const getters = {
  boolean: 'getBooleanDetails',
  string: 'getStringDetails',
  number: 'getNumberDetails',
  object: 'getObjectDetails',
};

const results = [];
for (const [index, group] of groups.entries()) {
  const domain = `group-${index}`;
  await OpenFeature.setProviderAndWait(domain, new OFREPProvider({ baseUrl, headers: group.headers }));
  const client = OpenFeature.getClient(domain);
  for (const { flag, type, default: fallback, context } of group.cases) {
    const details = await client[getters[type]](flag, fallback, context);
    results.push({
      value: details.value,
      reason: details.reason,
      variant: details.variant ?? null,
      errorCode: details.errorCode ?? null,
      flagMetadata: details.flagMetadata,
    });
  }
}
await OpenFeature.close();
process.stdout.write(JSON.stringify(results));
