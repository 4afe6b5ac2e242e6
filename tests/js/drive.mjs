// Drives the official Azure JavaScript SDK (@azure/identity, @azure/keyvault-secrets,
// @azure/keyvault-certificates) against kv-agent's emulator, for tests/emulator/test_emulator_js.py.
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
import { CertificateClient, DefaultCertificatePolicy } from "@azure/keyvault-certificates";
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

function base64(bytes, alphabet = "base64") {
  return bytes ? Buffer.from(bytes).toString(alphabet) : null;
}

function policy(value) {
  return value
    ? {
        issuerName: value.issuerName ?? null,
        subject: value.subject ?? null,
        keyType: value.keyType ?? null,
        keySize: value.keySize ?? null,
        exportable: value.exportable ?? null,
        contentType: value.contentType ?? null,
        validityInMonths: value.validityInMonths ?? null,
        dnsNames: value.subjectAlternativeNames?.dnsNames ?? null,
      }
    : null;
}

function certificateProperties(item) {
  return {
    name: item.name,
    id: item.id ?? null,
    version: item.version ?? null,
    enabled: item.enabled ?? null,
    expiresOn: seconds(item.expiresOn),
    x5t: base64(item.x509Thumbprint, "base64url"),
  };
}

function certificate(value) {
  return {
    ...certificateProperties(value.properties),
    keyId: value.keyId ?? null,
    secretId: value.secretId ?? null,
    cer: base64(value.cer),
    policy: policy(value.policy),
  };
}

// step.policy: "default" (DefaultCertificatePolicy) or a CertificatePolicy object.
const CERTIFICATE_OPERATIONS = {
  createCertificate: async (client, step) => {
    const wanted = step.policy === "default" ? DefaultCertificatePolicy : step.policy;
    const poller = await client.beginCreateCertificate(step.name, wanted, POLL);
    return certificate(await poller.pollUntilDone());
  },
  getCertificate: async (client, step) => certificate(await client.getCertificate(step.name)),
  getCertificateVersion: async (client, step) =>
    certificate(await client.getCertificateVersion(step.name, step.version)),
  getCertificatePolicy: async (client, step) =>
    policy(await client.getCertificatePolicy(step.name)),
  getCertificateOperation: async (client, step) => {
    const poller = await client.getCertificateOperation(step.name, POLL);
    const operation = poller.getOperationState().certificateOperation ?? {};
    return { status: operation.status ?? null, target: operation.target ?? null };
  },
  listCertificates: async (client, step) =>
    (await pages(client.listPropertiesOfCertificates(), step.maxPageSize)).map(
      (page) => page.map((item) => item.name)),
  listCertificateVersions: async (client, step) => {
    const result = [];
    for await (const item of client.listPropertiesOfCertificateVersions(step.name)) {
      result.push(certificateProperties(item));
    }
    return result;
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
  const options = {
    disableChallengeResourceVerification: !plan.verifyChallengeResource,
    retryOptions: { maxRetries: 0 },
  };
  const client = new SecretClient(plan.vaultUrl, credential, options);
  const certificates = new CertificateClient(plan.vaultUrl, credential, options);
  const results = [];
  for (const step of plan.steps) {
    const [operation, target] = OPERATIONS[step.op]
      ? [OPERATIONS[step.op], client]
      : [CERTIFICATE_OPERATIONS[step.op], certificates];
    if (operation === undefined) throw new Error(`unknown op ${step.op}`);
    try {
      results.push({ ok: await operation(target, step) });
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
