#!/usr/bin/env node
// Registers one device with the official Node provisioning client (azure-iot-provisioning-device with the
// -mqtt or -http transport) using a symmetric key, and prints the registration state as JSON.
//
// Used by server/tests/compat_sdk.rs against `zerotouch serve`; works unchanged against Azure DPS.
// The SDKs come from scripts/sdk-setup (${ZEROTOUCH_SDK_DIR:-~/.cache/zerotouch/sdk}/node). The clients
// take no CA option: trust a self-hosted server's CA with NODE_EXTRA_CA_CERTS=ca.pem.
// Ports: mqtt accepts --host HOST:PORT; mqtt-ws always uses 443 and http always 443.
//
// Exit status: 0 and the registration state on stdout, 1 and {"error":...} when the client failed,
// 2 for bad arguments.
'use strict';

const crypto = require('node:crypto');
const os = require('node:os');
const path = require('node:path');
const { createRequire } = require('node:module');
const { parseArgs } = require('node:util');

const USAGE = `usage: register.js --id-scope S --registration-id R (--symmetric-key K | --group-key K)
                   [--host HOST[:PORT]] [--transport mqtt|mqtt-ws|http] [--payload JSON]
Every option also reads an environment variable: ZT_HOST, ZT_ID_SCOPE, ZT_REGISTRATION_ID,
ZT_SYMMETRIC_KEY, ZT_GROUP_KEY, ZT_TRANSPORT, ZT_PAYLOAD.`;

function fail(message) {
  process.stderr.write(`register.js: error: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function options(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        host: { type: 'string', default: process.env.ZT_HOST || 'localhost' },
        'id-scope': { type: 'string', default: process.env.ZT_ID_SCOPE },
        'registration-id': { type: 'string', default: process.env.ZT_REGISTRATION_ID },
        'symmetric-key': { type: 'string', default: process.env.ZT_SYMMETRIC_KEY },
        'group-key': { type: 'string', default: process.env.ZT_GROUP_KEY },
        transport: { type: 'string', default: process.env.ZT_TRANSPORT || 'mqtt' },
        payload: { type: 'string', default: process.env.ZT_PAYLOAD },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
    }));
  } catch (e) {
    fail(e.message);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (!values['id-scope'] || !values['registration-id']) fail('--id-scope and --registration-id are required');
  if (!values['symmetric-key'] === !values['group-key']) fail('give exactly one of --symmetric-key or --group-key');
  if (!['mqtt', 'mqtt-ws', 'http'].includes(values.transport)) fail(`unknown transport ${values.transport}`);
  if (values.payload !== undefined) {
    try {
      values.payload = JSON.parse(values.payload);
    } catch (e) {
      fail(`--payload is not JSON: ${e.message}`);
    }
  }
  return values;
}

// The derivation the DPS documentation gives for group enrollments: HMAC-SHA256 keyed by the decoded
// group key over the registration id, base64.
function deriveDeviceKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');
}

function sdkRequire() {
  const dir = path.join(process.env.ZEROTOUCH_SDK_DIR || path.join(os.homedir(), '.cache', 'zerotouch', 'sdk'), 'node');
  return createRequire(path.join(dir, 'package.json'));
}

async function main() {
  const opts = options(process.argv.slice(2));
  const registrationId = opts['registration-id'];
  const key = opts['symmetric-key'] || deriveDeviceKey(opts['group-key'], registrationId);
  const sdk = sdkRequire();
  const { ProvisioningDeviceClient } = sdk('azure-iot-provisioning-device');
  const { SymmetricKeySecurityClient } = sdk('azure-iot-security-symmetric-key');
  let transport;
  if (opts.transport === 'http') {
    const { Http } = sdk('azure-iot-provisioning-device-http');
    transport = new Http();
  } else {
    const { Mqtt, MqttWs } = sdk('azure-iot-provisioning-device-mqtt');
    transport = opts.transport === 'mqtt' ? new Mqtt() : new MqttWs();
  }
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const client = ProvisioningDeviceClient.create(opts.host, opts['id-scope'], transport, security);
  if (opts.payload !== undefined) client.setProvisioningPayload(opts.payload);
  try {
    const state = await client.register();
    process.stdout.write(`${JSON.stringify(state)}\n`);
    return 0;
  } catch (e) {
    const out = { error: (e && e.name) || 'Error', message: String((e && e.message) || e) };
    // The transport's raw result may be circular (sockets); keep it only when it serialises.
    if (e && e.result) {
      try {
        out.result = JSON.parse(JSON.stringify(e.result));
      } catch {
        out.result = String(e.result);
      }
    }
    process.stdout.write(`${JSON.stringify(out)}\n`);
    return 1;
  }
}

// Exit explicitly: a transport that keeps a socket or timer alive must not hang the harness.
main().then((code) => process.exit(code), (e) => {
  process.stdout.write(`${JSON.stringify({ error: 'Error', message: String(e) })}\n`);
  process.exit(1);
});
