//! Randomness for the driver: a seeded xorshift generator (a run is
//! reproducible from its printed seed) and byte-level mutations of inputs.

/// Longest input the driver builds.
pub const MAX_INPUT: usize = 256 * 1024;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }

    pub fn u16(&mut self) -> u16 {
        (self.u64() >> 48) as u16
    }

    pub fn u8(&mut self) -> u8 {
        (self.u64() >> 56) as u8
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.u64() % n as u64) as usize
        }
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// `min..min + spread` random bytes.
    pub fn noise(&mut self, min: usize, spread: usize) -> Vec<u8> {
        let n = min + self.below(spread);
        (0..n).map(|_| self.u8()).collect()
    }
}

/// Values that sit on the edges of lengths, counts and limits.
const INTERESTING: [u32; 12] = [0, 1, 2, 4, 0x7f, 0x200, 0x201, 0x1000, 0x1_0000, 0x1_0001, 0x7fff_ffff, 0xffff_ffff];

/// Applies one to four random edits to `input`; `pool` lends material to
/// splice in.
pub fn mutate(r: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..1 + r.below(4) {
        let len = input.len();
        let at = r.below(len + 1);
        match r.below(9) {
            0 if len > 0 => input[at.min(len - 1)] ^= 1 << r.below(8),
            1 if len > 0 => input[at.min(len - 1)] = r.u8(),
            2 if len > 0 => input[at.min(len - 1)] = r.pick(&[0, 1, 0x7f, 0x80, 0xff]),
            3 if len >= 4 => {
                let at = at.min(len - 4);
                input[at..at + 4].copy_from_slice(&r.pick(&INTERESTING).to_be_bytes());
            }
            4 => {
                let n = r.below(len - at + 1).min(1 + r.below(64));
                input.drain(at..at + n);
            }
            5 => {
                let n = r.below(len - at + 1).min(1 + r.below(256));
                let copy = input[at..at + n].to_vec();
                let to = r.below(len + 1);
                input.splice(to..to, copy);
            }
            6 => {
                let extra = r.noise(1, 16);
                input.splice(at..at, extra);
            }
            7 if !pool.is_empty() => {
                let other = &pool[r.below(pool.len())];
                let from = r.below(other.len() + 1);
                let n = r.below(other.len() - from + 1).min(1 + r.below(512));
                input.splice(at..at, other[from..from + n].iter().copied());
            }
            _ => {
                // The setup bytes of a handshake case, the first bytes of any.
                if len >= 2 {
                    input[r.below(2)] = r.u8();
                }
            }
        }
    }
    input.truncate(MAX_INPUT);
}
