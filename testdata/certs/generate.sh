#!/bin/sh
# Regenerates the fixed test vectors in this folder (see README.md). Run from this folder.
# The outputs are committed; rerunning changes every key and certificate.
set -eu

# RSA 2048 keys for rcgen, which cannot generate RSA keys with ring (PKCS#8 PEM).
for i in 1 2 3 4 5 6 7 8; do
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "rsa-$i.key.pem"
done

# RSA-PSS chain: root (rsaEncryption key, PSS-SHA-256 self-signature) ->
# intermediate (id-RSASSA-PSS key, signed PSS-SHA-384) -> leaf CN=pss-device (signed PSS-SHA-512).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pss() { echo "-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest -sigopt rsa_mgf1_md:$1 -$1"; }

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/root.key"
openssl genpkey -algorithm RSA-PSS -pkeyopt rsa_keygen_bits:2048 -out "$tmp/int.key"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out pss-leaf.key.pem

cat > "$tmp/ext.cnf" <<'CNF'
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

# shellcheck disable=SC2046
openssl req -x509 -new -key "$tmp/root.key" -subj "/O=zerotouch/CN=zerotouch PSS test root" \
    -days 36500 -set_serial 0x0100 $(pss sha256) \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out pss-root.pem

openssl req -new -key "$tmp/int.key" -subj "/O=zerotouch/CN=zerotouch PSS test intermediate" -out "$tmp/int.csr"
# shellcheck disable=SC2046
openssl x509 -req -in "$tmp/int.csr" -CA pss-root.pem -CAkey "$tmp/root.key" -set_serial 0x0200 \
    -days 36500 $(pss sha384) -extfile "$tmp/ext.cnf" -extensions ca -out pss-intermediate.pem

openssl req -new -key pss-leaf.key.pem -subj "/CN=pss-device" -out "$tmp/leaf.csr"
# shellcheck disable=SC2046
openssl x509 -req -in "$tmp/leaf.csr" -CA pss-intermediate.pem -CAkey "$tmp/int.key" -set_serial 0x0300 \
    -days 36500 $(pss sha512) -extfile "$tmp/ext.cnf" -extensions leaf -out pss-leaf.pem

openssl verify -CAfile pss-root.pem -untrusted pss-intermediate.pem pss-leaf.pem

# A version 1 device certificate (no extensions), as `openssl x509 -req` without `-extfile`
# makes with OpenSSL up to 3.1: ECDSA P-256 root (v3, CA) -> leaf CN=v1-device (v1).
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/v1-root.key"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out v1-device.key.pem
openssl req -x509 -new -key "$tmp/v1-root.key" -subj "/O=zerotouch/CN=zerotouch v1 test root" \
    -days 36500 -set_serial 0x0400 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out v1-root.pem
openssl req -new -key v1-device.key.pem -subj "/CN=v1-device" -out "$tmp/v1-device.csr"
openssl x509 -req -in "$tmp/v1-device.csr" -CA v1-root.pem -CAkey "$tmp/v1-root.key" -set_serial 0x0500 \
    -days 36500 -out v1-device.pem
openssl verify -CAfile v1-root.pem v1-device.pem
