'use strict';
/**
 * Framing of the sandbox channel for the Node host, as protofly/sandbox/channel.py frames it: a 4-byte
 * big-endian length, then JSON, one reTHINK message or an array of them (everything queued in one turn of
 * the event loop).  An oversized frame is skipped as it arrives, never buffered whole.
 */

const DEFAULT_MAX_FRAME = 1 << 20;

/** Bytes in -> messages out; oversized or invalid frames are reported to `onError` and skipped. */
class FrameDecoder {
  constructor(maxFrame = DEFAULT_MAX_FRAME, onError = () => {}) {
    this.maxFrame = maxFrame;
    this.onError = onError;
    this.buffer = Buffer.alloc(0);
    this.skip = 0;
  }

  feed(data) {
    const out = [];
    if (this.skip) {
      const taken = Math.min(this.skip, data.length);
      this.skip -= taken;
      data = data.subarray(taken);
    }
    let buffer = this.buffer.length ? Buffer.concat([this.buffer, data]) : data;
    let pos = 0;
    while (buffer.length - pos >= 4) {
      const length = buffer.readUInt32BE(pos);
      const start = pos + 4;
      if (length > this.maxFrame) {
        this.onError('oversized', length);
        const available = buffer.length - start;
        if (available >= length) {
          pos = start + length;
          continue;
        }
        this.skip = length - available;
        pos = buffer.length;
        break;
      }
      if (buffer.length - start < length) break;
      let value;
      try {
        value = JSON.parse(buffer.toString('utf8', start, start + length));
      } catch (err) {
        value = undefined;
        this.onError('invalid', length);
      }
      if (Array.isArray(value)) out.push(...value.filter(isMessage));
      else if (isMessage(value)) out.push(value);
      else if (value !== undefined) this.onError('invalid', length);
      pos = start + length;
    }
    this.buffer = Buffer.from(buffer.subarray(pos));
    return out;
  }
}

function isMessage(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** Messages queued in one turn of the event loop leave as one frame (a batch), as the Python side does. */
class FrameWriter {
  constructor(write, maxFrame = DEFAULT_MAX_FRAME) {
    this.write = write;
    this.maxFrame = maxFrame;
    this.parts = [];
    this.scheduled = false;
  }

  /** Queue `msg`; throws (naming the size) when it can never fit a frame. */
  add(msg) {
    const data = Buffer.from(JSON.stringify(msg), 'utf8');
    if (data.length > this.maxFrame) {
      throw new RangeError(`message of ${data.length} bytes is over the ${this.maxFrame}-byte frame limit`);
    }
    this.parts.push(data);
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  flush() {
    this.scheduled = false;
    const parts = this.parts;
    if (!parts.length) return;
    this.parts = [];
    for (const group of groups(parts, this.maxFrame)) this.write(frame(group));
  }
}

function groups(parts, maxFrame) {
  const out = [];
  let current = [];
  let size = 1;
  for (const part of parts) {
    if (current.length && size + part.length + 1 > maxFrame) {
      out.push(current);
      current = [];
      size = 1;
    }
    current.push(part);
    size += part.length + 1;
  }
  out.push(current);
  return out;
}

function frame(parts) {
  const payload = parts.length === 1
    ? parts[0]
    : Buffer.concat([Buffer.from('['), ...parts.flatMap((p, i) => (i ? [Buffer.from(','), p] : [p])), Buffer.from(']')]);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(payload.length, 0);
  return Buffer.concat([header, payload]);
}

module.exports = { DEFAULT_MAX_FRAME, FrameDecoder, FrameWriter, frame, isMessage };
