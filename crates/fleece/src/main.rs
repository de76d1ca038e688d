//! The `fleece` command; everything is in the library (`lib.rs`).

fn main() {
    fleece::main()
}
