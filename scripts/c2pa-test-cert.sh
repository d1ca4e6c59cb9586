#!/usr/bin/env bash
# A throwaway C2PA signing certificate for trying out `imagegen serve --c2pa-cert/--c2pa-key`
# and for tests: a P-256 CA and a signing certificate it issues, shaped as C2PA's certificate
# profile requires (not self-signed; key usage digitalSignature; extended key usage
# emailProtection; authority and subject key identifiers). Images signed with it validate,
# but no reader trusts this CA: production needs a certificate from a CA on the C2PA trust
# list.
#
#   scripts/c2pa-test-cert.sh DIR [DAYS]
#
# Writes DIR/chain.pem (signing certificate, then CA), DIR/key.pem (its key, PKCS#8) and
# DIR/ca.pem. In Kubernetes: kubectl create secret tls imagegen-c2pa --cert=DIR/chain.pem
# --key=DIR/key.pem, then runtime.c2pa.existingSecret=imagegen-c2pa.
set -euo pipefail
dir="${1:?usage: $0 DIR [DAYS]}"
days="${2:-30}"
command -v openssl >/dev/null || { echo "c2pa-test-cert: openssl is not installed" >&2; exit 1; }
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca.key" 2>/dev/null
openssl req -x509 -new -key "$work/ca.key" -days "$days" -out "$dir/ca.pem" \
    -subj "/CN=imagegen test CA/O=imagegen test" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/key.pem" 2>/dev/null
openssl req -new -key "$dir/key.pem" -out "$work/signer.csr" \
    -subj "/CN=imagegen test signer/O=imagegen test"
printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=emailProtection" "authorityKeyIdentifier=keyid" \
    "subjectKeyIdentifier=hash" >"$work/signer.ext"
openssl x509 -req -in "$work/signer.csr" -CA "$dir/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -CAserial "$work/ca.srl" -days "$days" -extfile "$work/signer.ext" \
    -out "$work/signer.pem" 2>/dev/null
cat "$work/signer.pem" "$dir/ca.pem" >"$dir/chain.pem"
chmod 600 "$dir/key.pem"
echo "c2pa-test-cert: wrote $dir/chain.pem, $dir/key.pem, $dir/ca.pem" >&2
