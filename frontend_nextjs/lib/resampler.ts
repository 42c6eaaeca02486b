/**
 * Streaming sample-rate conversion with a windowed-sinc (Blackman) low-pass filter, for any pair of rates.
 *
 * Browsers run their AudioContext at the device's rate (44.1 or 48 kHz, sometimes other rates) and some
 * ignore a requested rate, while the wire is 16 kHz. Linear interpolation would fold everything above
 * 8 kHz back into the speech band when downsampling, so we filter properly: the cutoff sits just below the
 * lower rate's Nyquist frequency and the Blackman window keeps aliases about 70 dB down.
 */

/** Zero crossings of the sinc on each side of the centre: a longer filter has a sharper cutoff. */
const ZERO_CROSSINGS = 16;
/** Cutoff as a fraction of the lower Nyquist frequency; the rest is the filter's transition band. */
const CUTOFF = 0.9;
/** Filter values stored per input sample period; values between them are interpolated linearly. */
const TABLE_STEPS = 128;

export class Resampler {
  /** Input samples per output sample. */
  private readonly step: number;
  /** The filter extends this many input samples to each side of an output sample's position. */
  private readonly halfWidth: number;
  /** The filter's right half, h(x) for x = i / TABLE_STEPS input samples; h(-x) = h(x). */
  private readonly table: Float32Array;
  /** Input not yet used up: past samples the filter still reaches, then samples not yet read. */
  private pending: Float32Array;
  /** Position of the next output sample in `pending`, in input samples. */
  private position: number;

  constructor(inRate: number, outRate: number) {
    this.step = inRate / outRate;
    // Normalized to the input rate: below 1 when downsampling, so the filter also removes what the
    // output cannot carry.
    const cutoff = CUTOFF * Math.min(1, outRate / inRate);
    this.halfWidth = Math.ceil(ZERO_CROSSINGS / cutoff);
    this.table = new Float32Array(this.halfWidth * TABLE_STEPS + 2);
    for (let i = 0; i < this.table.length; i++) {
      const x = i / TABLE_STEPS;
      const u = Math.min(1, x / this.halfWidth); // 0 at the centre, 1 at the edge
      const blackman = 0.42 + 0.5 * Math.cos(Math.PI * u) + 0.08 * Math.cos(2 * Math.PI * u);
      const t = Math.PI * cutoff * x;
      const sinc = x === 0 ? 1 : Math.sin(t) / t;
      this.table[i] = cutoff * sinc * blackman;
    }
    // Start with silence before the first sample, so the first output sample lines up with it.
    this.pending = new Float32Array(this.halfWidth);
    this.position = this.halfWidth;
  }

  /**
   * Converts the next piece of a stream. The output lags the input by the filter's half width (about
   * 1 ms): the last output samples come with the next call.
   */
  process(input: Float32Array): Float32Array {
    const buffer = new Float32Array(this.pending.length + input.length);
    buffer.set(this.pending);
    buffer.set(input, this.pending.length);

    const count = Math.max(0, Math.ceil((buffer.length - this.halfWidth - this.position) / this.step));
    const output = new Float32Array(count);
    for (let n = 0; n < count; n++) {
      output[n] = this.filterAt(buffer, this.position);
      this.position += this.step;
    }

    // Keep what the next output samples still need, and rebase the position onto it.
    const keepFrom = Math.max(0, Math.floor(this.position) - this.halfWidth);
    this.pending = buffer.slice(keepFrom);
    this.position -= keepFrom;
    return output;
  }

  private filterAt(buffer: Float32Array, position: number): number {
    // process() only asks for positions whose whole filter lies inside `buffer`.
    const centre = Math.floor(position);
    let sum = 0;
    for (let k = centre - this.halfWidth + 1; k <= centre + this.halfWidth; k++) {
      const x = Math.abs(position - k) * TABLE_STEPS;
      const i = Math.floor(x);
      sum += buffer[k] * (this.table[i] + (this.table[i + 1] - this.table[i]) * (x - i));
    }
    return sum;
  }
}
