//! A TCP proxy on 127.0.0.1 that can cut every connection and refuse new ones: a database
//! outage that affects one worker and not the other tests sharing the server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    /// Cancelled to sever the connections that exist now; replaced on each cut.
    live: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (d, l, s) = (down.clone(), live.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                if d.load(Ordering::SeqCst) {
                    // Refused: closed before a byte is exchanged.
                    drop(client);
                    continue;
                }
                let token = l.lock().expect("not poisoned").clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            down,
            live,
            stop,
        })
    }

    /// Severs every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        let mut live = self.live.lock().expect("not poisoned");
        live.cancel();
        *live = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.live.lock().expect("not poisoned").cancel();
    }
}
