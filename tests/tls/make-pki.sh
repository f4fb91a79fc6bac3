#!/usr/bin/env bash
# Test credentials in nbdkit's/libnbd's layouts, under $1:
#   server/   ca-cert.pem server-cert.pem server-key.pem   (SAN localhost, 127.0.0.1)
#   alice/ bob/   ca-cert.pem client-cert.pem client-key.pem  (CN=alice / CN=bob)
#   stranger/     the same for CN=alice, but signed by another CA
#   keys.psk      identities alice and bob (psktool)
#   wrong.psk     identity alice with another key
# Needs openssl and psktool (gnutls-bin).
set -euo pipefail
root=$1
mkdir -p "$root"/{server,alice,bob,stranger,ca,ca2}
cd "$root"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # dir cn
  key "$1/ca-key.pem"
  openssl req -x509 -new -key "$1/ca-key.pem" -out "$1/ca-cert.pem" -days 7 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
sign() { # ca-dir out-cert key cn ext
  openssl req -new -key "$3" -subj "/CN=$4" -out "$2.csr" 2>/dev/null
  printf '%s\n' "$5" > "$2.ext"
  openssl x509 -req -in "$2.csr" -CA "$1/ca-cert.pem" -CAkey "$1/ca-key.pem" -CAcreateserial -days 7 -out "$2" -extfile "$2.ext" 2>/dev/null
  rm -f "$2.csr" "$2.ext"
}
ca ca nbdvirt-test-ca
ca ca2 another-ca
key server/server-key.pem
sign ca server/server-cert.pem server/server-key.pem localhost \
  $'subjectAltName=DNS:localhost,IP:127.0.0.1\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth'
cp ca/ca-cert.pem server/
for who in alice bob; do
  key $who/client-key.pem
  sign ca $who/client-cert.pem $who/client-key.pem $who \
    "subjectAltName=DNS:$who.example"$'\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
  cp ca/ca-cert.pem $who/
done
key stranger/client-key.pem
sign ca2 stranger/client-cert.pem stranger/client-key.pem alice \
  $'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
cp ca/ca-cert.pem stranger/
rm -f keys.psk wrong.psk
psktool -u alice -p keys.psk >/dev/null
psktool -u bob -p keys.psk >/dev/null
psktool -u alice -p wrong.psk >/dev/null
