#!/usr/bin/env node
// Compiles chain/evm/TaskSettlement.sol with the pinned solc-js (package.json) through its
// standard JSON interface and writes chain/evm/TaskSettlement.json: the ABI, creation and
// runtime bytecode, compiler version, settings and the source's sha256, as sorted-key JSON
// with a 2-space indent and a trailing newline (byte-for-byte reproducible).
//   node chain/evm/compile.js           write the artifact
//   node chain/evm/compile.js --check   exit 1 if the committed artifact differs from a fresh
//                                       compile (the source changed without recompiling)
// Any compiler error or warning fails the build; so does runtime code over the EIP-170 limit.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

const HERE = __dirname;
const CONTRACT = 'TaskSettlement';
const SOURCE_NAME = `${CONTRACT}.sol`;
const SOURCE_PATH = path.join(HERE, SOURCE_NAME);
const ARTIFACT_PATH = path.join(HERE, `${CONTRACT}.json`);
const RELATIVE_ARTIFACT = path.relative(process.cwd(), ARTIFACT_PATH) || ARTIFACT_PATH;
const EXPECTED_COMPILER = '0.8.30';
const MAX_RUNTIME_BYTES = 24576; // EIP-170

// viaIR stays off unless the legacy pipeline cannot compile the contract (stack too deep).
const SETTINGS = {
  evmVersion: 'cancun',
  optimizer: { enabled: true, runs: 200 },
  viaIR: false,
};

function fail(message) {
  process.stderr.write(`compile.js: ${message}\n`);
  process.exit(1);
}

function loadSolc() {
  try {
    return require(path.join(HERE, 'node_modules', 'solc'));
  } catch (err) {
    fail(`cannot load solc from ${path.join(HERE, 'node_modules')} (${err.message}); run \`bash scripts/setup\``);
  }
  return null;
}

// JSON with object keys sorted at every level (arrays keep their order).
function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value !== null && typeof value === 'object') {
    const out = {};
    for (const key of Object.keys(value).sort()) out[key] = sortKeys(value[key]);
    return out;
  }
  return value;
}

function stableJson(value) {
  return `${JSON.stringify(sortKeys(value), null, 2)}\n`;
}

function compile() {
  const solc = loadSolc();
  const version = solc.version();
  if (!version.startsWith(`${EXPECTED_COMPILER}+`)) {
    fail(`solc ${version} is installed, ${EXPECTED_COMPILER} is pinned; run \`bash scripts/setup\``);
  }
  const source = fs.readFileSync(SOURCE_PATH);
  const input = {
    language: 'Solidity',
    sources: { [SOURCE_NAME]: { content: source.toString('utf8') } },
    settings: {
      ...SETTINGS,
      outputSelection: {
        [SOURCE_NAME]: { [CONTRACT]: ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] },
      },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const problems = (output.errors || []).filter((e) => e.severity === 'error' || e.severity === 'warning');
  if (problems.length) {
    const text = problems.map((e) => e.formattedMessage || e.message).join('\n');
    fail(`solc reported ${problems.length} error(s)/warning(s) in ${SOURCE_NAME}:\n${text}`);
  }
  const contract = output.contracts && output.contracts[SOURCE_NAME] && output.contracts[SOURCE_NAME][CONTRACT];
  if (!contract || !contract.evm.bytecode.object) fail(`solc produced no bytecode for ${CONTRACT}`);
  const runtimeBytes = contract.evm.deployedBytecode.object.length / 2;
  if (runtimeBytes > MAX_RUNTIME_BYTES) {
    fail(`${CONTRACT}'s runtime code is ${runtimeBytes} bytes, over the EIP-170 limit of ${MAX_RUNTIME_BYTES}`);
  }
  return stableJson({
    contractName: CONTRACT,
    compiler: version,
    settings: SETTINGS,
    sourceSha256: crypto.createHash('sha256').update(source).digest('hex'),
    abi: contract.abi,
    bytecode: `0x${contract.evm.bytecode.object}`,
    deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
  });
}

function firstDifference(expected, actual) {
  let parsed;
  try {
    parsed = JSON.parse(actual);
  } catch (err) {
    return 'it is not valid JSON';
  }
  const fresh = JSON.parse(expected);
  const keys = Array.from(new Set([...Object.keys(fresh), ...Object.keys(parsed)])).sort();
  const differing = keys.filter((k) => JSON.stringify(sortKeys(fresh[k])) !== JSON.stringify(sortKeys(parsed[k])));
  return differing.length ? `differing fields: ${differing.join(', ')}` : 'only its formatting differs';
}

function main(argv) {
  const args = argv.slice(2);
  const unknown = args.filter((a) => a !== '--check');
  if (unknown.length) fail(`unknown argument(s) ${unknown.join(' ')}; usage: node compile.js [--check]`);
  const artifact = compile();
  if (args.includes('--check')) {
    if (!fs.existsSync(ARTIFACT_PATH)) {
      fail(`${RELATIVE_ARTIFACT} is missing; run \`node chain/evm/compile.js\` and commit it`);
    }
    const committed = fs.readFileSync(ARTIFACT_PATH, 'utf8');
    if (committed !== artifact) {
      fail(
        `${RELATIVE_ARTIFACT} is stale (${firstDifference(artifact, committed)}): it is not what ` +
          `${SOURCE_NAME} compiles to; run \`node chain/evm/compile.js\` and commit the result`,
      );
    }
    process.stdout.write(`${RELATIVE_ARTIFACT} is up to date\n`);
    return;
  }
  fs.writeFileSync(ARTIFACT_PATH, artifact);
  const runtimeBytes = (JSON.parse(artifact).deployedBytecode.length - 2) / 2;
  process.stdout.write(`wrote ${RELATIVE_ARTIFACT} (runtime ${runtimeBytes} bytes)\n`);
}

main(process.argv);
