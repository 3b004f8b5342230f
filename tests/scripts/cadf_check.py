#!/usr/bin/env python3
"""Validate NDJSON CADF 1.0 events (stdin) with pycadf.

pycadf has no from-dict/deserializer, so each JSON object is rebuilt from
pycadf classes (Event, Resource, Host, Reason, Attachment, ...). pycadf's
ValidatorDescriptors validate every attribute on assignment (action/outcome
against cadftaxonomy, resource typeURI against RESOURCE_TAXONOMY, ids via
identifier.is_valid, ...) and Event.is_valid() checks the mandatory set.
On top of that (our own strictness, using pycadf's constants):
  * keys not in pycadf's *_KEYNAMES lists are rejected;
  * event typeURI must equal pycadf's event.TYPE_URI_EVENT;
  * eventTime / reporterTime must be ISO 8601 with an offset
    (--pycadf-time: exactly pycadf's timestamp.TIME_FORMAT);
  * with --strict-ids, pycadf's "Invalid uuid" warnings become errors.
Exit 0 if all events valid; exit 1 naming the first invalid event.
"""
import datetime
import json
import sys
import warnings

# pycadf validates on assignment; cadftaxonomy (ACTIONS/OUTCOMES/RESOURCE
# taxonomies) is consulted through the Event/Resource descriptors.
from pycadf import (attachment, credential, endpoint, event, geolocation, host,
                    measurement, metric, reason, reporterstep, resource,
                    timestamp)


class Invalid(Exception):
    pass


def _obj(d, path):
    if not isinstance(d, dict):
        raise Invalid(f"{path}: expected object, got {type(d).__name__}")
    return d


def _list(d, key, path):
    v = d.get(key, [])
    if not isinstance(v, list):
        raise Invalid(f"{path}.{key}: must be an array")
    return v


def _keys(d, allowed, path):
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise Invalid(f"{path}: keys not in CADF/pycadf model: {extra}")


def _set(obj, key, value, path):
    """setattr through pycadf's ValidatorDescriptor, with a readable error."""
    try:
        setattr(obj, key, value)
    except (ValueError, TypeError, AttributeError) as e:
        why = str(e).split(": <function")[0]  # drop the lambda repr
        raise Invalid(f"{path}.{key}={value!r}: rejected by pycadf ({why})")


PYCADF_TIME = "--pycadf-time" in sys.argv[1:]


def _time(v, path):
    if not isinstance(v, str):
        raise Invalid(f"{path}: timestamp must be a string")
    if PYCADF_TIME:  # exactly what pycadf itself emits
        try:
            datetime.datetime.strptime(v, timestamp.TIME_FORMAT)
        except ValueError:
            raise Invalid(f"{path}={v!r}: not in pycadf TIME_FORMAT "
                          f"{timestamp.TIME_FORMAT} (e.g. 2024-05-01T12:00:00.000000+0000)")
        return
    try:  # CADF: ISO 8601 with a timezone offset
        t = datetime.datetime.fromisoformat(v)
    except ValueError:
        raise Invalid(f"{path}={v!r}: not an ISO 8601 timestamp")
    if t.tzinfo is None:
        raise Invalid(f"{path}={v!r}: timestamp has no timezone offset")


def _simple(cls, keynames, d, path):
    d = _obj(d, path)
    _keys(d, keynames, path)
    o = cls.__new__(cls)
    for k, v in d.items():
        _set(o, k, v, path)
    return o


def build_host(d, path):
    return _simple(host.Host, host.HOST_KEYNAMES, d, path)


def build_reason(d, path):
    r = _simple(reason.Reason, reason.REASON_KEYNAMES, d, path)
    if not r.is_valid():
        raise Invalid(f"{path}: Reason needs reasonType+reasonCode or policyType+policyId")
    return r


def build_attachment(d, path):
    d = _obj(d, path)
    _keys(d, attachment.ATTACHMENT_KEYNAMES, path)
    a = attachment.Attachment(**{k: d[k] for k in d})
    if not a.is_valid():
        raise Invalid(f"{path}: Attachment needs typeURI, name and content")
    return a


def build_credential(d, path):
    d = _obj(d, path)
    fed = any(k in d for k in ("identity_provider", "user", "groups"))
    names = credential.FED_CRED_KEYNAMES if fed else credential.CRED_KEYNAMES
    _keys(d, names, path)
    if "token" not in d:
        raise Invalid(f"{path}: Credential.token is mandatory")
    try:
        c = (credential.FederatedCredential(**{k: d.get(k) for k in names}) if fed
             else credential.Credential(token=d["token"], type=d.get("type")))
    except (ValueError, TypeError) as e:
        raise Invalid(f"{path}: rejected by pycadf ({e})")
    if not c.is_valid():
        raise Invalid(f"{path}: invalid credential")
    return c


def build_resource(d, path):
    d = _obj(d, path)
    _keys(d, resource.RESOURCE_KEYNAMES, path)
    r = resource.Resource.__new__(resource.Resource)
    if "id" not in d:
        raise Invalid(f"{path}.id: mandatory")
    _set(r, "id", d["id"], path)
    for k, v in d.items():
        if k in ("id", "addresses", "attachments"):
            continue
        if k == "host":
            v = build_host(v, f"{path}.host")
        elif k == "credential":
            v = build_credential(v, f"{path}.credential")
        elif k == "geolocation":
            v = _simple(geolocation.Geolocation, geolocation.GEO_KEYNAMES, v,
                        f"{path}.geolocation")
        elif k == "typeURI" and not isinstance(v, str):
            raise Invalid(f"{path}.typeURI: must be a string")
        _set(r, k, v, path)
    for i, a in enumerate(_list(d, "addresses", path)):
        p = f"{path}.addresses[{i}]"
        e = _simple(endpoint.Endpoint, endpoint.ENDPOINT_KEYNAMES, a, p)
        try:
            r.add_address(e)
        except ValueError as ex:
            raise Invalid(f"{p}: {ex}")
    for i, a in enumerate(_list(d, "attachments", path)):
        r.add_attachment(build_attachment(a, f"{path}.attachments[{i}]"))
    if not r.is_valid():
        raise Invalid(f"{path}: Resource.is_valid() is False (id and typeURI required)")
    return r


def build_measurement(d, path):
    d = _obj(d, path)
    _keys(d, measurement.MEASUREMENT_KEYNAMES, path)
    m = measurement.Measurement.__new__(measurement.Measurement)
    for k, v in d.items():
        if k == "metric":
            v = _simple(metric.Metric, metric.METRIC_KEYNAMES, v, f"{path}.metric")
            if not v.is_valid():
                raise Invalid(f"{path}.metric: needs metricId and unit")
        elif k == "calculatedBy":
            v = build_resource(v, f"{path}.calculatedBy")
        _set(m, k, v, path)
    if not m.is_valid():
        raise Invalid(f"{path}: Measurement needs result and exactly one of metric/metricId")
    return m


def build_event(d):
    d = _obj(d, "event")
    _keys(d, event.EVENT_KEYNAMES, "event")
    if d.get("typeURI") != event.TYPE_URI_EVENT:
        raise Invalid(f"event.typeURI={d.get('typeURI')!r}: must be {event.TYPE_URI_EVENT!r}")
    for k in ("eventType", "id", "eventTime", "action", "outcome"):
        if k not in d:
            raise Invalid(f"event.{k}: mandatory attribute missing")
    _time(d["eventTime"], "event.eventTime")
    for k in ("action", "outcome"):  # cadftaxonomy.is_valid_* call str methods
        if not isinstance(d[k], str):
            raise Invalid(f"event.{k}: must be a string")
    ev = event.Event.__new__(event.Event)
    ev.typeURI = event.TYPE_URI_EVENT
    for k, v in d.items():
        if k in ("typeURI", "measurements", "tags", "attachments", "reporterchain"):
            continue
        if k in ("initiator", "target", "observer"):
            v = build_resource(v, f"event.{k}")
        elif k == "reason":
            v = build_reason(v, "event.reason")
        _set(ev, k, v, "event")
    for i, m in enumerate(_list(d, "measurements", "event")):
        ev.add_measurement(build_measurement(m, f"event.measurements[{i}]"))
    for i, t in enumerate(_list(d, "tags", "event")):
        try:
            ev.add_tag(t)
        except (ValueError, TypeError):
            raise Invalid(f"event.tags[{i}]: must be a string")
    for i, a in enumerate(_list(d, "attachments", "event")):
        ev.add_attachment(build_attachment(a, f"event.attachments[{i}]"))
    for i, s in enumerate(_list(d, "reporterchain", "event")):
        p = f"event.reporterchain[{i}]"
        s = _obj(s, p)
        _keys(s, reporterstep.REPORTERSTEP_KEYNAMES, p)
        st = reporterstep.Reporterstep.__new__(reporterstep.Reporterstep)
        for k, v in s.items():
            if k == "reporter":
                v = build_resource(v, f"{p}.reporter")
            elif k == "reporterTime":
                _time(v, f"{p}.reporterTime")
            _set(st, k, v, p)
        try:
            ev.add_reporterstep(st)
        except ValueError as e:
            raise Invalid(f"{p}: {e} (needs role and exactly one of reporter/reporterId)")
    if not ev.is_valid():
        missing = [f"exactly one of {a}/{a}Id" for a in ("initiator", "target", "observer")
                   if ev._isset(a) == ev._isset(a + "Id")]
        raise Invalid(f"event: Event.is_valid() is False: {missing or 'mandatory attribute missing'}")
    return ev


def main():
    strict_ids = "--strict-ids" in sys.argv[1:]  # usage: [--strict-ids] [--pycadf-time]
    n = 0
    for lineno, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        n += 1
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"line {lineno}: not JSON: {e}", file=sys.stderr)
            return 1
        label = f"line {lineno} (id={d.get('id') if isinstance(d, dict) else None!r})"
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                build_event(d)
            except Invalid as e:
                print(f"INVALID CADF event {label}: {e}", file=sys.stderr)
                return 1
            except (ValueError, TypeError, AttributeError) as e:  # raised inside pycadf
                why = str(e).split(": <function")[0]
                print(f"INVALID CADF event {label}: rejected by pycadf: {why}", file=sys.stderr)
                return 1
        for x in w:
            msg = f"{label}: pycadf warning: {x.message}"
            if strict_ids:
                print(f"INVALID CADF event {msg}", file=sys.stderr)
                return 1
            print(f"warning {msg}", file=sys.stderr)
    print(f"OK: {n} CADF event(s) valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
