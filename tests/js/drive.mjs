// Drives the official Azure JavaScript SDK (@azure/identity, @azure/keyvault-secrets)
// against kv-agent's emulator, for tests/test_emulator_js.py.
//
// Input (stdin, JSON): {"vaultUrl": ..., "verifyChallengeResource": bool,
//   "credential": ManagedIdentityCredential options, e.g. {"objectId": ...} (optional), "steps": [{"op": ..., ...}, ...]}
// Output (stdout, JSON): one result per step, in order: {"ok": <value>} or
//   {"error": {"name", "statusCode", "code", "innerCode", "message"}}. A step's failure does not
//   stop the next step. Dates are epoch seconds. Only the emulator's made-up test
//   values ever pass through here.
//
// The environment points the SDK at the emulator: AZURE_POD_IDENTITY_AUTHORITY_HOST
// (msal-node's IMDS host override) and NODE_EXTRA_CA_CERTS (the emulator's CA).

import { ManagedIdentityCredential } from "@azure/identity";
import { SecretClient } from "@azure/keyvault-secrets";

const POLL = { updateIntervalInMs: 50 };

function seconds(date) {
  return date instanceof Date ? Math.floor(date.getTime() / 1000) : null;
}

function properties(item) {
  return {
    name: item.name,
    version: item.version ?? null,
    id: item.id ?? null,
    enabled: item.enabled ?? null,
    contentType: item.contentType ?? null,
    tags: item.tags ?? null,
    managed: item.managed ?? null,
    keyId: item.keyId ?? null,
    notBefore: seconds(item.notBefore),
    expiresOn: seconds(item.expiresOn),
    recoveryId: item.recoveryId ?? null,
    deletedOn: seconds(item.deletedOn),
    scheduledPurgeDate: seconds(item.scheduledPurgeDate),
  };
}

function secret(bundle) {
  return { value: bundle.value ?? null, ...properties(bundle.properties) };
}

async function pages(iterable, maxPageSize) {
  const result = [];
  const settings = maxPageSize ? { maxPageSize } : {};
  for await (const page of iterable.byPage(settings)) {
    result.push(page.map(properties));
  }
  return result;
}

function attributes(step) {
  const options = {};
  if (step.contentType !== undefined) options.contentType = step.contentType;
  if (step.tags !== undefined) options.tags = step.tags;
  if (step.enabled !== undefined) options.enabled = step.enabled;
  if (step.notBefore !== undefined) options.notBefore = new Date(step.notBefore * 1000);
  if (step.expiresOn !== undefined) options.expiresOn = new Date(step.expiresOn * 1000);
  return options;
}

const OPERATIONS = {
  get: async (client, step) => {
    const options = {};
    if (step.version) options.version = step.version;
    if (step.outContentType) options.outContentType = step.outContentType;
    return secret(await client.getSecret(step.name, options));
  },
  list: async (client, step) =>
    pages(client.listPropertiesOfSecrets(), step.maxPageSize),
  versions: async (client, step) =>
    pages(client.listPropertiesOfSecretVersions(step.name), step.maxPageSize),
  set: async (client, step) =>
    secret(await client.setSecret(step.name, step.value, attributes(step))),
  update: async (client, step) =>
    properties(await client.updateSecretProperties(step.name, step.version, attributes(step))),
  delete: async (client, step) => {
    const poller = await client.beginDeleteSecret(step.name, POLL);
    return secret(await poller.pollUntilDone());
  },
  getDeleted: async (client, step) => secret(await client.getDeletedSecret(step.name)),
  listDeleted: async (client, step) => pages(client.listDeletedSecrets(), step.maxPageSize),
  recover: async (client, step) => {
    const poller = await client.beginRecoverDeletedSecret(step.name, POLL);
    return properties(await poller.pollUntilDone());
  },
  purge: async (client, step) => {
    await client.purgeDeletedSecret(step.name);
    return null;
  },
};

function describe(error) {
  const details = error.details?.error ?? {};
  return {
    name: error.name ?? null,
    statusCode: error.statusCode ?? null,
    code: error.code ?? details.code ?? null,
    // The SDK's deserialiser renames the wire's "innererror" to "innerError".
    innerCode: (details.innerError ?? details.innererror)?.code ?? null,
    message: String(error.message ?? "").slice(0, 300),
  };
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const plan = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const credential = new ManagedIdentityCredential(plan.credential ?? {});
  const client = new SecretClient(plan.vaultUrl, credential, {
    disableChallengeResourceVerification: !plan.verifyChallengeResource,
    retryOptions: { maxRetries: 0 },
  });
  const results = [];
  for (const step of plan.steps) {
    const operation = OPERATIONS[step.op];
    if (operation === undefined) throw new Error(`unknown op ${step.op}`);
    try {
      results.push({ ok: await operation(client, step) });
    } catch (error) {
      results.push({ error: describe(error) });
    }
  }
  process.stdout.write(JSON.stringify(results));
}

main().catch((error) => {
  process.stderr.write(`drive.mjs: ${error?.stack ?? error}\n`);
  process.exit(2);
});
