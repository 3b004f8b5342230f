"""An independent verifier of an Auditbridge log bundle, written from the specifications
(C2SP signed-note, tlog-checkpoint, RFC 6962), with Python's hashlib and the `cryptography`
package's Ed25519: none of Auditbridge's code.

    python3 verify_bundle.py BUNDLE_DIR VERIFIER_KEY

Prints `OK <origin> <size>` and exits 0 when the checkpoint is signed by the key and the
events reproduce its root; prints why not and exits 1 otherwise.
"""

import base64
import hashlib
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def fail(why):
    print("FAIL " + why)
    sys.exit(1)


def mth(leaves):
    """RFC 6962 section 2.1: the Merkle tree hash of a list of leaf hashes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def main(bundle, verifier):
    # signed-note verifier key: <name>+<hex key ID>+<base64(0x01 || Ed25519 public key)>.
    name, key_hash, key_data = verifier.strip().split("+", 2)
    raw = base64.b64decode(key_data)
    if len(raw) != 33 or raw[0] != 1:
        fail("not an Ed25519 verifier key")
    key_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if key_id.hex() != key_hash:
        fail("the verifier key's hash does not match its name and key")
    public = Ed25519PublicKey.from_public_bytes(raw[1:])

    with open(bundle + "/checkpoint", "rb") as f:
        note = f.read().decode("utf-8")
    cut = note.rindex("\n\n")
    text, signatures = note[: cut + 1], note[cut + 2 :]
    verified = False
    for line in signatures.rstrip("\n").split("\n"):
        if not line.startswith("\u2014 "):
            fail("a malformed signature line")
        signer, sig = line[2:].split(" ", 1)
        sig = base64.b64decode(sig)
        if signer == name and sig[:4] == key_id:
            try:
                public.verify(sig[4:], text.encode("utf-8"))
            except InvalidSignature:
                fail("the checkpoint's signature does not verify")
            verified = True
    if not verified:
        fail("the checkpoint is not signed by " + name)

    origin, size, root = text.split("\n")[:3]
    size, root = int(size), base64.b64decode(root)
    with open(bundle + "/events.jsonl", "rb") as f:
        lines = f.read().split(b"\n")
    if lines[-1] != b"":
        fail("events.jsonl does not end in a newline")
    leaves = [hashlib.sha256(b"\x00" + line).digest() for line in lines[:-1]]
    if len(leaves) != size:
        fail("%d events, the checkpoint is of %d" % (len(leaves), size))
    if mth(leaves) != root:
        fail("the events do not reproduce the checkpoint's root")
    print("OK %s %d" % (origin, size))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
