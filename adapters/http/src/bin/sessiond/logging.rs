//! Log lines to stderr, buffered.

use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cli::LogFormat;

/// Where log lines go: stderr, through a buffer flushed every 100 ms (and when full, and
/// at exit), so that a request costs neither a write system call nor a thread wake-up for
/// its log line.
#[derive(Clone)]
pub(crate) struct LogSink(Arc<Mutex<BufWriter<std::io::Stderr>>>);

/// One log line being written into the buffer.
pub(crate) struct LogLine<'a>(MutexGuard<'a, BufWriter<std::io::Stderr>>);

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // Flushed by the timer, not per line.
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogLine<'a>;
    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl LogSink {
    pub(crate) fn flush(&self) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

pub(crate) fn init_logging(format: LogFormat) -> LogSink {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sink = LogSink(Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        std::io::stderr(),
    ))));
    let builder = tracing_subscriber::fmt()
        .with_writer(sink.clone())
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    sink
}
