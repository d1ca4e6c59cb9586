fn main() {
    eprintln!("imagegen: no commands yet");
    std::process::exit(2);
}
