#!/usr/bin/env bash
# Make a private CA and two certificates signed by it, for a TLS Dask cluster:
#
#   OUTDIR/ca.pem       CA certificate: every scheduler, worker and client needs it
#   OUTDIR/ca.key       CA key: only to sign more certificates; keep it off the cluster
#   OUTDIR/node.pem     certificate of the scheduler and the workers
#   OUTDIR/node.key
#   OUTDIR/client.pem   certificate of the emdist driver (a Dask client)
#   OUTDIR/client.key
#
# Usage: make-certs.sh OUTDIR [HOST_OR_IP ...]
#
# subjectAltName always holds localhost and 127.0.0.1, plus the extra arguments
# (an argument that looks like an IP address becomes IP:, anything else DNS:).
# Dask itself does not compare host names (distributed/security.py sets
# check_hostname = False): a peer is trusted when its certificate is signed by
# ca.pem. Keys are written with mode 600. DAYS (default 365) sets the validity of
# the node and client certificates; the CA is valid for 10 years.
# Works with OpenSSL 1.0.2 and later (no -addext, no -copy_extensions).
set -euo pipefail

usage() {
    echo "usage: $0 OUTDIR [HOST_OR_IP ...]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac
outdir=$1
shift
days=${DAYS:-365}

command -v openssl >/dev/null || { echo "$0: openssl not found" >&2; exit 1; }

for f in ca.key ca.pem node.key node.pem client.key client.pem; do
    if [ -e "$outdir/$f" ]; then
        echo "$0: $outdir/$f exists; remove the old files first" >&2
        exit 1
    fi
done

umask 077
mkdir -p "$outdir"

san="DNS:localhost,IP:127.0.0.1"
for h in "$@"; do
    if [[ $h =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $h == *:* ]]; then
        san="$san,IP:$h"
    else
        san="$san,DNS:$h"
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/openssl.cnf" <<EOF
[ req ]
distinguished_name = dn
prompt = no

[ dn ]
CN = emdist

[ v3_ca ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ node_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[ client_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

serial() { echo "0x$(openssl rand -hex 16)"; }

# CA
openssl genrsa -out "$work/ca.key" 2048 2>/dev/null
openssl req -x509 -new -sha256 -days 3650 -key "$work/ca.key" \
    -config "$work/openssl.cnf" -extensions v3_ca -subj "/CN=emdist-dask-ca" \
    -set_serial "$(serial)" -out "$work/ca.pem"

# node (scheduler + workers) and client
sign() {  # name extensions-section common-name
    openssl genrsa -out "$work/$1.key" 2048 2>/dev/null
    openssl req -new -sha256 -key "$work/$1.key" -config "$work/openssl.cnf" \
        -subj "/CN=$3" -out "$work/$1.csr"
    openssl x509 -req -sha256 -days "$days" -in "$work/$1.csr" \
        -CA "$work/ca.pem" -CAkey "$work/ca.key" -set_serial "$(serial)" \
        -extfile "$work/openssl.cnf" -extensions "$2" -out "$work/$1.pem" 2>/dev/null
    openssl verify -CAfile "$work/ca.pem" "$work/$1.pem" >/dev/null
}
sign node node_ext emdist-dask-node
sign client client_ext emdist-dask-client

for f in ca node client; do
    cp "$work/$f.key" "$outdir/$f.key"
    cp "$work/$f.pem" "$outdir/$f.pem"
    chmod 600 "$outdir/$f.key"
    chmod 644 "$outdir/$f.pem"
done

echo "wrote $outdir/{ca,node,client}.{pem,key}; subjectAltName: $san"
