#!/usr/bin/env node
// Validate NDJSON ECS documents (stdin) against the field list shipped in the
// npm package @elastic/ecs (EcsFlat: flat_name -> {type, normalize,
// object_type, allowed_values, pattern, required, ...}). Offline.
//
// usage: node ecs_check.js [--allow PREFIX]... [--strict-arrays] [--pin-version]
//   --allow PREFIX   accept any field under PREFIX (your custom namespace)
//   --strict-arrays  fields with normalize ["array"] must be JSON arrays
//   --pin-version    ecs.version must equal the package's EcsVersion
// Exit 0 if every document is valid, 1 otherwise (each problem on stderr).
'use strict';
const net = require('net');
const path = require('path');
const readline = require('readline');

function loadEcs() {
  try { return require('@elastic/ecs'); } catch (e) { /* fall through */ }
  return require(path.join(__dirname, 'node', 'node_modules', '@elastic', 'ecs'));
}
const { EcsFlat, EcsVersion } = loadEcs();

const args = process.argv.slice(2);
const allow = [];
for (let i = 0; i < args.length; i++) if (args[i] === '--allow') allow.push(args[++i]);
const strictArrays = args.includes('--strict-arrays');
const pinVersion = args.includes('--pin-version');

// Every proper prefix of an ECS field name is an intermediate object ("user", "user.group").
const PREFIXES = new Set();
for (const name of Object.keys(EcsFlat)) {
  const parts = name.split('.');
  for (let i = 1; i < parts.length; i++) PREFIXES.add(parts.slice(0, i).join('.'));
}
const hasChildren = (p) => PREFIXES.has(p);
const isPlainObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const allowed = (p) => allow.some((a) => p === a || p.startsWith(a + '.'));

const STRING_TYPES = new Set(['keyword', 'constant_keyword', 'wildcard', 'text', 'match_only_text', 'version']);
const INT_TYPES = new Set(['long', 'integer', 'short', 'byte', 'unsigned_long']);
const FLOAT_TYPES = new Set(['float', 'double', 'half_float', 'scaled_float']);

// Returns null if ok, else a reason. `v` is one scalar (array elements are checked one by one).
function checkScalar(def, v) {
  const t = def.type;
  if (STRING_TYPES.has(t)) {
    if (typeof v !== 'string') return `expected string (${t}), got ${typeof v}`;
    if (def.pattern && !new RegExp(def.pattern).test(v)) return `${JSON.stringify(v)} does not match ECS pattern ${def.pattern}`;
    if (def.allowed_values && !def.allowed_values.some((a) => a.name === v))
      return `${JSON.stringify(v)} not in allowed values [${def.allowed_values.map((a) => a.name).join(', ')}]`;
    return null;
  }
  if (INT_TYPES.has(t)) return Number.isInteger(v) ? null : `expected integer (${t}), got ${JSON.stringify(v)}`;
  if (FLOAT_TYPES.has(t)) return typeof v === 'number' ? null : `expected number (${t}), got ${JSON.stringify(v)}`;
  if (t === 'boolean') return typeof v === 'boolean' ? null : `expected boolean, got ${JSON.stringify(v)}`;
  if (t === 'ip') return typeof v === 'string' && net.isIP(v) ? null : `expected IPv4/IPv6 string, got ${JSON.stringify(v)}`;
  if (t === 'date') {
    // Elasticsearch default date format: strict_date_optional_time || epoch_millis
    if (Number.isInteger(v)) return null;
    if (typeof v === 'string' && /^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?)?$/.test(v)
        && !Number.isNaN(Date.parse(v.replace(/(\.\d{3})\d+/, '$1')))) return null;
    return `expected ISO 8601 date string or epoch millis, got ${JSON.stringify(v)}`;
  }
  if (t === 'geo_point') {
    if (isPlainObject(v) && typeof v.lat === 'number' && typeof v.lon === 'number') return null;
    if (typeof v === 'string' && /^\s*-?\d+(\.\d+)?\s*,\s*-?\d+(\.\d+)?\s*$|^POINT\s*\(/i.test(v)) return null;
    return `expected geo_point ({lat,lon}, "lat,lon", [lon,lat] or WKT), got ${JSON.stringify(v)}`;
  }
  return `no check for ECS type ${t}`;
}

function walk(p, v, out) {
  if (v === null) return; // null == absent in Elasticsearch
  if (p && allowed(p)) return;
  const def = p ? EcsFlat[p] : undefined;

  if (!def) {
    if (!p || hasChildren(p)) {
      if (isPlainObject(v)) { for (const [k, c] of Object.entries(v)) walk(p ? `${p}.${k}` : k, c, out); return; }
      if (Array.isArray(v) && p) { v.forEach((e) => walk(p, e, out)); return; }
      out.push([p || '(document)', p ? `'${p}' is an ECS field set, not a leaf; got ${JSON.stringify(v)}` : 'not a JSON object']);
      return;
    }
    out.push([p, `not an ECS ${EcsVersion} field`]);
    return;
  }

  const t = def.type;
  if (t === 'flattened') { if (!isPlainObject(v)) out.push([p, 'flattened field must be an object']); return; }
  if (t === 'object' || t === 'nested') {
    const elems = Array.isArray(v) ? v : [v];
    if (t === 'nested' && !hasChildren(p)) return; // free-form nested (e.g. gen_ai.request.encoding_formats)
    for (const e of elems) {
      if (!isPlainObject(e)) { out.push([p, `${t} field must be an object (or array of objects), got ${JSON.stringify(e)}`]); continue; }
      if (def.object_type) { // labels, container.labels: object of <object_type> values, arbitrary keys
        const sub = { type: def.object_type };
        for (const [k, c] of Object.entries(e)) {
          for (const x of Array.isArray(c) ? c : [c]) {
            const why = isPlainObject(x) ? `${p} values must be ${def.object_type}, not nested objects` : checkScalar(sub, x);
            if (why) out.push([`${p}.${k}`, why]);
          }
        }
      } else if (hasChildren(p)) {
        for (const [k, c] of Object.entries(e)) walk(`${p}.${k}`, c, out);
      } // else free-form object (entity.raw, entity.metrics, ...): anything goes
    }
    return;
  }

  // leaf
  if (t === 'geo_point' && Array.isArray(v) && v.length === 2 && v.every((x) => typeof x === 'number')) return; // [lon, lat]
  if (Array.isArray(v)) {
    v.forEach((e, i) => { const why = isPlainObject(e) || Array.isArray(e) ? `array element ${i} is not a scalar` : checkScalar(def, e); if (why) out.push([p, why]); });
    return;
  }
  if (isPlainObject(v) && t !== 'geo_point') { out.push([p, `is a leaf of type ${t}, got an object (sub-field ${Object.keys(v)[0]} is not in ECS)`]); return; }
  if (strictArrays && (def.normalize || []).includes('array')) out.push([p, 'ECS normalize=array: value must be a JSON array']);
  const why = checkScalar(def, v);
  if (why) out.push([p, why]);
}

function lookup(doc, dotted) { // handles nested objects and dotted keys alike
  if (!isPlainObject(doc)) return undefined;
  const parts = dotted.split('.');
  for (let i = parts.length; i >= 1; i--) {
    const k = parts.slice(0, i).join('.');
    if (k in doc) return i === parts.length ? doc[k] : lookup(doc[k], parts.slice(i).join('.'));
  }
  return undefined;
}

const REQUIRED = Object.keys(EcsFlat).filter((k) => EcsFlat[k].required); // @timestamp, ecs.version

async function main() {
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  let n = 0, bad = 0, lineno = 0;
  for await (const line of rl) {
    lineno++;
    if (!line.trim()) continue;
    n++;
    let doc, out = [];
    try { doc = JSON.parse(line); } catch (e) { out.push(['(line)', `not JSON: ${e.message}`]); }
    if (!out.length) {
      walk('', doc, out);
      for (const r of REQUIRED) if (lookup(doc, r) == null) out.push([r, 'required ECS field missing']);
      const ver = lookup(doc, 'ecs.version');
      if (pinVersion && ver != null && ver !== EcsVersion) out.push(['ecs.version', `${JSON.stringify(ver)} but the checker pins ECS ${EcsVersion}`]);
    }
    if (out.length) {
      bad++;
      const id = lookup(doc, 'event.id');
      for (const [p, why] of out) console.error(`INVALID ECS ${EcsVersion} document line ${lineno} (event.id=${JSON.stringify(id)}): ${p}: ${why}`);
    }
  }
  console.log(`${n - bad}/${n} document(s) valid against ECS ${EcsVersion} (@elastic/ecs EcsFlat, ${Object.keys(EcsFlat).length} fields)`);
  process.exitCode = bad ? 1 : 0;
}
main();
