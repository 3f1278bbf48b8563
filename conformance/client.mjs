// Run the http-cache-tests client through an HTTP forward proxy.
//
// The suite's CLI fetches its test URLs directly: 0.4.5 (the npm release)
// with node-fetch, newer checkouts with the global fetch.  Neither honours
// HTTP_PROXY.  This wrapper runs the suite's own runner on the suite's own
// tests, unmodified, and only changes where the requests go:
//
//  - 0.4.5 (client/runner.mjs): the runner takes a fetch function; it gets
//    node-fetch with an http.Agent that connects to the proxy and sends each
//    request in absolute form ("GET http://origin/test/... HTTP/1.1").
//  - newer (test-engine/client/runner.mjs): the runner calls the global
//    fetch; it becomes the suite's own undici fetch, with an undici
//    ProxyAgent (proxyTunnel off, so plain http goes to the proxy in
//    absolute form rather than through CONNECT) as the global dispatcher.
//    The interim-response tests build their own undici Agent; it is
//    composed onto the proxy agent instead.
//
// Usage:
//   node client.mjs --base http://127.0.0.1:PORT [--proxy http://127.0.0.1:PORT]
//                   [--suite DIR] [--id TEST-ID ...] [--dump] [--timeout MS]
//                   [--out FILE]
//
// Writes one JSON document (to FILE or stdout):
//   { "suite": "http-cache-tests", "version", "layout", "base", "proxy",
//     "tests": [ { "id", "suite", "name", "kind", "depends_on", "result" } ] }
// where "result" is what the suite records: true, or [errorName, message].

import fs from 'fs'
import http from 'http'
import path from 'path'
import process from 'process'
import { createRequire } from 'module'
import { fileURLToPath, pathToFileURL } from 'url'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const DEFAULT_SUITE = path.join(HERE, 'node_modules', 'http-cache-tests')

/**
 * An http.Agent that sends every request to one HTTP proxy, with the
 * origin's absolute URL as the request target.  Connections to the proxy
 * are kept alive and reused, as a browser's are.
 */
class ForwardProxyAgent extends http.Agent {
  constructor (proxyUrl) {
    super({ keepAlive: true })
    const url = new URL(proxyUrl)
    if (url.protocol !== 'http:') throw new Error(`unsupported proxy URL ${proxyUrl}`)
    this.proxyHost = url.hostname.replace(/^\[(.*)\]$/, '$1')
    this.proxyPort = parseInt(url.port || '80', 10)
  }

  addRequest (request, options) {
    if (request._header) {
      // Node renders the request line early only when an Expect header is
      // set; it would then carry the origin-form target.
      throw new Error('request line already rendered; cannot proxy it')
    }
    request.path = `http://${request.getHeader('host')}${request.path}`
    super.addRequest(request, {
      ...options,
      host: this.proxyHost,
      hostname: this.proxyHost,
      port: this.proxyPort
    })
  }
}

function parseArgs (argv) {
  const args = { ids: [], dump: false, timeout: 30000, suite: DEFAULT_SUITE }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`)
      return argv[++i]
    }
    if (arg === '--base') args.base = value().replace(/\/+$/, '')
    else if (arg === '--proxy') args.proxy = value()
    else if (arg === '--suite') args.suite = path.resolve(value())
    else if (arg === '--id') args.ids.push(value())
    else if (arg === '--dump') args.dump = true
    else if (arg === '--timeout') args.timeout = parseInt(value(), 10)
    else if (arg === '--out') args.out = value()
    else throw new Error(`unknown argument ${arg}`)
  }
  if (!args.base) throw new Error('--base is required')
  return args
}

function selectTests (all, ids, dump) {
  if (ids.length === 0) return all
  const wanted = new Set(ids)
  const selected = []
  for (const suite of all) {
    const tests = suite.tests.filter(test => wanted.has(test.id))
    tests.forEach(test => {
      wanted.delete(test.id)
      if (dump) test.dump = true
    })
    if (tests.length) selected.push({ ...suite, tests })
  }
  if (wanted.size) throw new Error(`unknown test id(s): ${[...wanted].join(' ')}`)
  return selected
}

async function importFrom (dir, ...parts) {
  return import(pathToFileURL(path.join(dir, ...parts)).href)
}

async function importPackage (dir, name) {
  const require = createRequire(path.join(dir, 'package.json'))
  const module = await import(pathToFileURL(require.resolve(name)).href)
  return module.default && !module.fetch ? module.default : module
}

/**
 * The 0.4.5 layout: tests/index.mjs plus tests/surrogate-control.mjs, as
 * its cli.mjs runs them, and a runner that takes the fetch function.
 */
async function legacySuite (dir, args) {
  const runner = await importFrom(dir, 'client', 'runner.mjs')
  const all = [
    ...(await importFrom(dir, 'tests', 'index.mjs')).default,
    (await importFrom(dir, 'tests', 'surrogate-control.mjs')).default
  ]
  const fetch = await importPackage(dir, 'node-fetch')
  const agent = args.proxy ? new ForwardProxyAgent(args.proxy) : undefined
  const proxiedFetch = (url, init) => fetch(url, { ...init, agent, timeout: args.timeout })
  return {
    all,
    run: selected => runner.runTests(selected, proxiedFetch, false, args.base),
    results: () => runner.getResults(),
    close: () => agent && agent.destroy()
  }
}

/**
 * The newer layout (git main): test-engine/, tests/index.mjs only, and a
 * runner that calls the global fetch.
 */
async function currentSuite (dir, args) {
  const runner = await importFrom(dir, 'test-engine', 'client', 'runner.mjs')
  const all = (await importFrom(dir, 'tests', 'index.mjs')).default
  const undici = await importPackage(dir, 'undici')
  let dispatcher = new undici.Agent()
  if (args.proxy) {
    const proxyAgent = new undici.ProxyAgent({ uri: args.proxy, proxyTunnel: false })
    const compose = undici.Dispatcher.prototype.compose
    undici.Dispatcher.prototype.compose = function (...interceptors) {
      const direct = this instanceof undici.Agent && !(this instanceof undici.ProxyAgent)
      return compose.apply(direct ? proxyAgent : this, interceptors)
    }
    dispatcher = proxyAgent
  }
  undici.setGlobalDispatcher(dispatcher)
  globalThis.fetch = undici.fetch
  return {
    all,
    run: selected => runner.runTests(selected, false, args.base),
    results: () => runner.getResults(),
    close: () => dispatcher.destroy()
  }
}

async function main () {
  const args = parseArgs(process.argv.slice(2))
  const manifest = JSON.parse(fs.readFileSync(path.join(args.suite, 'package.json'), 'utf8'))
  const layout = fs.existsSync(path.join(args.suite, 'test-engine', 'client', 'runner.mjs'))
    ? 'current'
    : 'legacy'
  const suite = layout === 'current'
    ? await currentSuite(args.suite, args)
    : await legacySuite(args.suite, args)
  const selected = selectTests(suite.all, args.ids, args.dump)

  await suite.run(selected)
  const results = suite.results()
  const tests = []
  for (const group of selected) {
    for (const test of group.tests) {
      if (test.browser_only === true) continue
      tests.push({
        id: test.id,
        suite: group.id,
        name: test.name,
        kind: test.kind || 'required',
        depends_on: test.depends_on || [],
        result: test.id in results ? results[test.id] : null
      })
    }
  }
  const report = JSON.stringify({
    suite: manifest.name,
    version: manifest.version,
    layout,
    base: args.base,
    proxy: args.proxy || null,
    tests
  }, null, 1)
  if (args.out) fs.writeFileSync(args.out, report + '\n')
  else process.stdout.write(report + '\n')
  await suite.close()
}

main().then(
  () => process.exit(0),
  err => {
    console.error(err && err.stack ? err.stack : String(err))
    process.exit(2)
  }
)
