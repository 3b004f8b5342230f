#!/usr/bin/env python3
"""Validate NDJSON OCSF events (stdin) offline against a pinned OCSF release.

Schema source: the schema.ocsf.io JSON export bundled in the PyPI package
ocsf-json-schema (ocsf_json_schema/ocsf/<version>.json), turned into a
JSON Schema 2020-12 document per class by that package, and checked with
the `jsonschema` package. No network access.

Checks per event:
  1. class_uid is an integer naming a class of the pinned release (and, by
     default, one of --classes 3001,3002,6003);
  2. JSON Schema of that class (no profiles unless --profiles): required
     attributes, types (time = integer ms), enum values of every *_id
     (activity_id, type_uid, severity_id, status_id, ...), class_uid/
     category_uid constants, string patterns/lengths of OCSF scalar types
     (ip_t, ...), at_least_one/just_one constraints, unknown attributes
     rejected (additionalProperties=false) except under `unmapped`
     (type `object`, free-form);
  3. cross-checks the export has but JSON Schema cannot express:
     type_uid == class_uid*100 + activity_id; metadata.version == pinned
     version; top-level sibling strings (activity_name, severity, status,
     type_name, ...) equal the enum caption of their *_id unless the id is 99;
  4. with --house: the extra paths in HOUSE below must be present (our own
     policy, not OCSF's; OCSF marks most of them "recommended").
Exit 0 if all valid, 1 if any event is invalid (each is named on stderr).
"""
import argparse
import json
import sys

from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

PINNED_VERSION = "1.8.0"
DEFAULT_CLASSES = "3001,3002,6003"

# Our own policy on top of OCSF (--house): dotted paths that must exist.
HOUSE = {
    "*": ["metadata.product.name", "metadata.product.vendor_name", "status_id"],
    3001: ["user", "actor.user.uid", "actor.user.name", "src_endpoint.ip"],
    3002: ["user", "src_endpoint.ip"],
    6003: ["api.operation", "actor.user.uid", "actor.user.name", "src_endpoint.ip"],
}


def jpath(parts):
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "(event)"


def describe(err):
    """One readable line for a jsonschema ValidationError."""
    where = jpath(err.absolute_path)
    v = err.validator
    if v == "required":
        missing = err.message.split("'")[1]
        return jpath(list(err.absolute_path) + [missing]), "required attribute missing"
    if v == "additionalProperties":
        return where, f"attribute(s) not defined for this class/object in OCSF: {err.message.split('(')[1].rstrip(')')}"
    if v in ("anyOf", "oneOf") and all(set(s) == {"required"} for s in err.validator_value):
        names = [s["required"][0] for s in err.validator_value]
        kind = "at least one" if v == "anyOf" else "exactly one"
        return where, f"needs {kind} of: {', '.join(names)}"
    if v in ("enum", "const"):
        allowed = err.validator_value if v == "enum" else [err.validator_value]
        return where, f"value {err.instance!r} not allowed; allowed: {sorted(allowed)}"
    if v == "pattern":
        return where, f"{err.instance!r} does not match the OCSF regex of type '{err.schema.get('title')}'"
    return where, err.message[:300]


class Checker:
    def __init__(self, version, classes, profiles, house):
        self.version = version
        self.raw = get_ocsf_schema(version)
        self.gen = OcsfJsonSchemaEmbedded(self.raw)
        self.classes = classes
        self.profiles = profiles
        self.house = house
        self.by_uid = {c["uid"]: c for c in self.raw["classes"].values()}
        self.validators = {}

    def validator(self, uid):
        if uid not in self.validators:
            schema = self.gen.get_class_schema(self.by_uid[uid]["name"], self.profiles)
            self.validators[uid] = Draft202012Validator(schema)
        return self.validators[uid]

    def check(self, ev):
        """Return a list of (attribute_path, reason)."""
        if not isinstance(ev, dict):
            return [("(event)", "not a JSON object")]
        uid = ev.get("class_uid")
        if not isinstance(uid, int) or isinstance(uid, bool):
            return [("class_uid", "missing or not an integer")]
        if uid not in self.by_uid:
            return [("class_uid", f"{uid} is not a class in OCSF {self.version}")]
        if self.classes and uid not in self.classes:
            return [("class_uid", f"{uid} not in the accepted classes {sorted(self.classes)}")]

        errs = [describe(e) for e in
                sorted(self.validator(uid).iter_errors(ev), key=lambda e: list(map(str, e.absolute_path)))]

        act, tuid = ev.get("activity_id"), ev.get("type_uid")
        if isinstance(act, int) and isinstance(tuid, int) and tuid != uid * 100 + act:
            errs.append(("type_uid", f"{tuid} != class_uid*100+activity_id = {uid * 100 + act}"))
        ver = (ev.get("metadata") or {}).get("version") if isinstance(ev.get("metadata"), dict) else None
        if ver is not None and ver != self.version:
            errs.append(("metadata.version", f"{ver!r} but this check pins OCSF {self.version!r}"))

        attrs = self.by_uid[uid]["attributes"]
        for name, a in attrs.items():
            sib, enum = a.get("sibling"), a.get("enum")
            if not (sib and enum and name in ev and sib in ev):
                continue
            val = ev[name]
            if val == 99 or str(val) not in enum:
                continue  # 99 = Other: sibling carries the source's own label
            cap = enum[str(val)].get("caption")
            if ev[sib] != cap:
                errs.append((sib, f"{ev[sib]!r} does not match {name}={val} caption {cap!r}"))

        if self.house:
            for path in HOUSE.get("*", []) + HOUSE.get(uid, []):
                cur = ev
                for part in path.split("."):
                    cur = cur.get(part) if isinstance(cur, dict) else None
                if cur is None:
                    errs.append((path, "required by house policy (--house), missing"))
        return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default=PINNED_VERSION,
                    help=f"OCSF release bundled in ocsf-json-schema (default {PINNED_VERSION})")
    ap.add_argument("--classes", default=DEFAULT_CLASSES,
                    help="comma-separated accepted class_uids, or 'all'")
    ap.add_argument("--profiles", default="", help="comma-separated OCSF profiles to enable")
    ap.add_argument("--house", action="store_true", help="also enforce HOUSE paths")
    ap.add_argument("--max-errors", type=int, default=20)
    a = ap.parse_args()
    classes = None if a.classes == "all" else {int(x) for x in a.classes.split(",") if x}
    profiles = [p for p in a.profiles.split(",") if p]
    chk = Checker(a.version, classes, profiles, a.house)

    n = bad = 0
    for lineno, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        n += 1
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            errs, ev = [("(line)", f"not JSON: {e}")], {}
        else:
            errs = chk.check(ev)
        if errs:
            bad += 1
            md = ev.get("metadata") if isinstance(ev, dict) else None
            eid = md.get("uid") if isinstance(md, dict) else None
            cls = ev.get("class_uid") if isinstance(ev, dict) else None
            for path, why in errs[: a.max_errors]:
                print(f"INVALID OCSF {a.version} event line {lineno} (class_uid={cls}, "
                      f"metadata.uid={eid!r}): {path}: {why}", file=sys.stderr)
    print(f"{n - bad}/{n} event(s) valid against OCSF {a.version}" + (" + house policy" if a.house else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
