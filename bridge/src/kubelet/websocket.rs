//! The remote command protocol over WebSockets (`v5`/`v4.channel.k8s.io`): one binary
//! message per write, its first byte the channel.

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use bytes::Bytes;
use tokio::sync::mpsc;

use super::streams::{Input, Job, Output, relay, take_resizes};

const CH_STDIN: u8 = 0;
const CH_STDOUT: u8 = 1;
const CH_STDERR: u8 = 2;
const CH_ERROR: u8 = 3;
const CH_RESIZE: u8 = 4;
/// v5: "the client closed this channel" (the next byte).
const CH_CLOSE: u8 = 255;

fn on_channel(ch: u8, data: &[u8]) -> Message {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(ch);
    out.extend_from_slice(data);
    Message::Binary(out.into())
}

/// Runs `job` over `socket` until the session ends or the client goes away.
pub(super) async fn serve(mut socket: WebSocket, job: Job) {
    let (input, inputs) = mpsc::unbounded_channel();
    let (outputs, mut output) = mpsc::channel(16);
    tokio::spawn(relay(job, inputs, outputs));
    let mut resizes = Vec::new();
    loop {
        tokio::select! {
            out = output.recv() => match out {
                Some(Output::Stdout(b)) => {
                    if socket.send(on_channel(CH_STDOUT, &b)).await.is_err() {
                        return;
                    }
                }
                Some(Output::Stderr(b)) => {
                    if socket.send(on_channel(CH_STDERR, &b)).await.is_err() {
                        return;
                    }
                }
                Some(Output::Status(status)) => {
                    let _ = socket.send(on_channel(CH_ERROR, &status)).await;
                    let _ = socket
                        .send(Message::Close(Some(CloseFrame {
                            code: close_code::NORMAL,
                            reason: "".into(),
                        })))
                        .await;
                    return;
                }
                None => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let sent = match b[0] {
                        CH_STDIN => input.send(Input::Stdin(Bytes::copy_from_slice(&b[1..]))),
                        CH_RESIZE => {
                            resizes.extend_from_slice(&b[1..]);
                            take_resizes(&mut resizes).into_iter().try_for_each(|r| input.send(r))
                        }
                        CH_CLOSE if b.get(1) == Some(&CH_STDIN) => input.send(Input::StdinClose),
                        _ => Ok(()),
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                // Dropping `input` tells the relay the client is gone.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
