// The http-cache-tests origin server, bound to one loopback address.
//
// The suite's own server.mjs listens on every interface and writes a PID
// file; this wrapper reuses its request handlers unchanged and only decides
// where to listen.  It works with the 0.4.5 layout (server/) and the newer
// one (test-engine/server/).
//
// Usage: node origin.mjs [ADDRESS [PORT [SUITE_DIR]]]
// (defaults: 127.0.0.1, 0 for any free port, node_modules/http-cache-tests).
// Prints one line, "LISTENING http://ADDRESS:PORT", once it accepts requests.

import fs from 'fs'
import http from 'http'
import path from 'path'
import process from 'process'
import { fileURLToPath, pathToFileURL } from 'url'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const address = process.argv[2] || '127.0.0.1'
const port = parseInt(process.argv[3] || '0', 10)
const suite = path.resolve(process.argv[4] || path.join(HERE, 'node_modules', 'http-cache-tests'))
const serverDir = fs.existsSync(path.join(suite, 'test-engine', 'server'))
  ? path.join(suite, 'test-engine', 'server')
  : path.join(suite, 'server')

async function handler (name) {
  return (await import(pathToFileURL(path.join(serverDir, name)).href)).default
}

const handlers = {
  config: await handler('handle-config.mjs'),
  state: await handler('handle-state.mjs'),
  test: await handler('handle-test.mjs')
}

function handleMain (request, response) {
  const url = new URL(request.url, `http://${address}/`)
  const pathSegs = url.pathname.split('/')
  pathSegs.shift()
  const handle = handlers[pathSegs.shift()]
  if (handle === undefined) {
    response.writeHead(404, { 'Content-Type': 'text/plain' })
    response.end('Not Found\n')
    return
  }
  handle(pathSegs, request, response)
}

const server = http.createServer(handleMain)
server.on('listening', () => {
  const bound = server.address()
  const host = bound.family === 'IPv6' ? `[${bound.address}]` : bound.address
  console.log(`LISTENING http://${host}:${bound.port}`)
})
server.listen(port, address)

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0))
}
