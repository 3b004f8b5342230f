"""An independent verifier of an Auditbridge log bundle, written from the specifications
(C2SP signed-note, tlog-checkpoint, RFC 6962), with Python's hashlib and the `cryptography`
package's Ed25519: none of Auditbridge's code.

    python3 verify_bundle.py BUNDLE_DIR VERIFIER_KEY

Prints `OK <origin> <size>` and exits 0 when the checkpoint is signed by the key and the
events reproduce its root; prints why not and exits 1 otherwise. An event whose line is
empty because it expired counts only where a retention receipt in `receipts.jsonl`, a
signed note by the same key of the same origin, names its index; its leaf hash is then
taken from `leaves.txt` (unsigned: the root still has to hold).
"""

import base64
import hashlib
import json
import os
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

    def open_note(note, what):
        """C2SP signed-note: the text, if a signature by the key verifies."""
        cut = note.rindex("\n\n")
        text, signatures = note[: cut + 1], note[cut + 2 :]
        verified = False
        for line in signatures.rstrip("\n").split("\n"):
            if not line.startswith("\u2014 "):
                fail("a malformed signature line in " + what)
            signer, sig = line[2:].split(" ", 1)
            sig = base64.b64decode(sig)
            if signer == name and sig[:4] == key_id:
                try:
                    public.verify(sig[4:], text.encode("utf-8"))
                except InvalidSignature:
                    fail("the signature of %s does not verify" % what)
                verified = True
        if not verified:
            fail("%s is not signed by %s" % (what, name))
        return text

    with open(bundle + "/checkpoint", "rb") as f:
        text = open_note(f.read().decode("utf-8"), "the checkpoint")
    origin, size, root = text.split("\n")[:3]
    size, root = int(size), base64.b64decode(root)

    # Retention receipts: the indexes whose payloads expired.
    expired = set()
    if os.path.exists(bundle + "/receipts.jsonl"):
        with open(bundle + "/receipts.jsonl", "rb") as f:
            for n, line in enumerate(f.read().decode("utf-8").splitlines(), 1):
                body = open_note(json.loads(line)["note"], "receipt %d" % n).split("\n")
                if body[0] != origin or body[1] != "auditbridge retention receipt v1":
                    fail("receipt %d is not a retention receipt of %s" % (n, origin))
                for field in body[2:]:
                    if field.startswith("indexes ") and field != "indexes none":
                        for part in field[len("indexes ") :].split(","):
                            a, _, b = part.partition("-")
                            expired.update(range(int(a), int(b or a) + 1))
    stored = []
    if os.path.exists(bundle + "/leaves.txt"):
        with open(bundle + "/leaves.txt", "rb") as f:
            stored = [l.split(b" ")[0] for l in f.read().split(b"\n")]

    with open(bundle + "/events.jsonl", "rb") as f:
        lines = f.read().split(b"\n")
    if lines[-1] != b"":
        fail("events.jsonl does not end in a newline")
    leaves = []
    for i, line in enumerate(lines[:-1]):
        if line == b"" and i in expired:
            if i >= len(stored) or stored[i] == b"-":
                fail("event %d expired, but leaves.txt has no leaf for it" % i)
            leaves.append(base64.b64decode(stored[i]))
        elif line == b"":
            fail("event %d is missing and no receipt covers it" % i)
        else:
            leaves.append(hashlib.sha256(b"\x00" + line).digest())
    if len(leaves) != size:
        fail("%d events, the checkpoint is of %d" % (len(leaves), size))
    if mth(leaves) != root:
        fail("the events do not reproduce the checkpoint's root")
    print("OK %s %d" % (origin, size))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
