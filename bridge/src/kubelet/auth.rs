//! Bearer tokens on the kubelet API: a caller without a client certificate may present a
//! token, which the apiserver checks (TokenReview). Answers are cached briefly, as a
//! kubelet caches them, so a scraper calling every few seconds costs one review a minute.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, api::PostParams};
use tracing::warn;

use super::{Ctx, Identity};

/// How long an answer is reused: accepted tokens (a kubelet's default is 2 minutes), and
/// refused ones (shorter: a token just created should work soon).
const ACCEPTED_FOR: Duration = Duration::from_secs(120);
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Answers kept; the cache is emptied when full (tokens are few, callers fewer).
const MAX_ENTRIES: usize = 4096;

/// Recent TokenReview answers by token (`None`: refused).
#[derive(Default)]
pub(super) struct TokenCache {
    answers: Mutex<HashMap<String, (Option<Identity>, Instant)>>,
}

impl TokenCache {
    fn get(&self, token: &str) -> Option<Option<Identity>> {
        let answers = self.answers.lock().ok()?;
        let (answer, at) = answers.get(token)?;
        let ttl = if answer.is_some() {
            ACCEPTED_FOR
        } else {
            REFUSED_FOR
        };
        (at.elapsed() < ttl).then(|| answer.clone())
    }

    fn put(&self, token: &str, answer: Option<Identity>) {
        if let Ok(mut answers) = self.answers.lock() {
            if answers.len() >= MAX_ENTRIES {
                answers.clear();
            }
            answers.insert(token.to_owned(), (answer, Instant::now()));
        }
    }
}

/// The caller a token stands for, if the apiserver accepts it.
async fn review(ctx: &Ctx, token: &str) -> Result<Option<Identity>, kube::Error> {
    if let Some(answer) = ctx.tokens.get(token) {
        return Ok(answer);
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(ctx.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let answer = reviewed
        .status
        .filter(|s| s.authenticated == Some(true))
        .and_then(|s| s.user)
        .and_then(|u| {
            Some(Identity {
                user: Some(u.username?),
                groups: u.groups.unwrap_or_default(),
            })
        });
    ctx.tokens.put(token, answer.clone());
    Ok(answer)
}

/// Middleware: a request from a caller without a certificate that carries
/// `Authorization: Bearer <token>` is served as the token's user, or refused with 401.
pub(super) async fn bearer(State(ctx): State<Ctx>, mut request: Request, next: Next) -> Response {
    let has_certificate = request
        .extensions()
        .get::<Arc<Identity>>()
        .is_some_and(|id| id.user.is_some());
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    if has_certificate {
        return next.run(request).await;
    }
    let Some(token) = token else {
        return next.run(request).await;
    };
    match review(&ctx, &token).await {
        Ok(Some(id)) => {
            request.extensions_mut().insert(Arc::new(id));
            next.run(request).await
        }
        Ok(None) => super::text(
            axum::http::StatusCode::UNAUTHORIZED,
            "Unauthorized: the token was not accepted",
        ),
        Err(e) => {
            warn!(error = %e, "TokenReview failed");
            super::text(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "authentication check failed",
            )
        }
    }
}
