#!/usr/bin/env python3
"""Registers one device with azure-iot-device's ProvisioningDeviceClient and prints the result as JSON.

Used by server/tests/compat_sdk.rs against `zerotouch serve`; runs just as well against Azure DPS.
Every option also reads an environment variable (ZT_HOST, ZT_ID_SCOPE, ...), so a shell can set them once.
The SDK connects to port 8883, or 443 with --websockets: it has no way to name a port.

Exit status: 0 and a JSON object with "status" on stdout when the service answered (assigned or not),
1 and {"error": ...} when the client raised, 2 for bad arguments.
"""

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import sys


def derive_device_key(group_key: str, registration_id: str) -> str:
    # The DPS documentation's derivation: HMAC-SHA256 keyed by the decoded group key over the id's bytes.
    digest = hmac.new(base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def parse_args(argv):
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env("ZT_HOST", "localhost"),
                   help="provisioning host name; must match the server certificate (env ZT_HOST)")
    p.add_argument("--id-scope", default=env("ZT_ID_SCOPE"), help="ID scope (env ZT_ID_SCOPE)")
    p.add_argument("--registration-id", default=env("ZT_REGISTRATION_ID"),
                   help="registration id (env ZT_REGISTRATION_ID)")
    cred = p.add_mutually_exclusive_group()
    cred.add_argument("--symmetric-key", default=env("ZT_SYMMETRIC_KEY"),
                      help="individual enrollment key, base64 (env ZT_SYMMETRIC_KEY)")
    cred.add_argument("--group-key", default=env("ZT_GROUP_KEY"),
                      help="enrollment group key, base64; the device key is derived from it (env ZT_GROUP_KEY)")
    cred.add_argument("--cert", default=env("ZT_CERT"),
                      help="device certificate PEM file, leaf first, then intermediates (env ZT_CERT)")
    p.add_argument("--key", default=env("ZT_KEY"), help="private key PEM file of --cert (env ZT_KEY)")
    p.add_argument("--ca", default=env("ZT_CA"),
                   help="PEM file of the CA that signed the server certificate (env ZT_CA)")
    p.add_argument("--websockets", action="store_true", default=env("ZT_WEBSOCKETS", "") not in ("", "0"),
                   help="MQTT over WebSockets on port 443 (env ZT_WEBSOCKETS=1)")
    p.add_argument("--payload", default=env("ZT_PAYLOAD"), help="custom payload, JSON text (env ZT_PAYLOAD)")
    p.add_argument("--verbose", action="store_true", help="SDK debug logging on stderr")
    args = p.parse_args(argv)
    if not args.id_scope or not args.registration_id:
        p.error("--id-scope and --registration-id are required")
    creds = [c for c in (args.symmetric_key, args.group_key, args.cert) if c]
    if len(creds) != 1:
        p.error("give exactly one of --symmetric-key, --group-key or --cert (with --key)")
    if args.cert and not args.key:
        p.error("--cert needs --key")
    if args.payload is not None:
        try:
            args.payload = json.loads(args.payload)
        except ValueError as e:
            p.error(f"--payload is not JSON: {e}")
    return args


def main(argv):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL, stream=sys.stderr)
    # Imported after parsing so that --help and argument errors work without the SDK installed.
    from azure.iot.device import ProvisioningDeviceClient, X509

    common = {"websockets": args.websockets}
    if args.ca:
        with open(args.ca, encoding="ascii") as f:
            common["server_verification_cert"] = f.read()
    if args.cert:
        client = ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=args.host, registration_id=args.registration_id, id_scope=args.id_scope,
            x509=X509(cert_file=args.cert, key_file=args.key), **common)
    else:
        key = args.symmetric_key or derive_device_key(args.group_key, args.registration_id)
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=args.host, registration_id=args.registration_id, id_scope=args.id_scope,
            symmetric_key=key, **common)
    if args.payload is not None:
        client.provisioning_payload = args.payload
    try:
        result = client.register()
    except Exception as e:  # noqa: BLE001 - any SDK failure is reported to the harness as JSON
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 1
    state = result.registration_state
    out = {"operationId": result.operation_id, "status": result.status}
    if state is not None:
        out.update({
            "assignedHub": state.assigned_hub,
            "deviceId": state.device_id,
            "substatus": state.sub_status,
            "createdDateTime": state.created_date_time,
            "lastUpdatedDateTime": state.last_update_date_time,
            "etag": state.etag,
            "payload": json.loads(state.response_payload),
        })
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
