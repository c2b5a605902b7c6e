//! The Enrollment service, on every tier: a host asks for its first certificate (with a join
//! token, or to wait for an administrator's approval) and renews it over its mutual-TLS
//! connection. A thin adapter: what a tier does with a request is its [`Tier`]'s (the centre
//! signs, see `certs`; a site passes it upstream).
use std::sync::Arc;

use tonic::{Request, Response, Status};
use updraft_proto::v1::enrollment_server::Enrollment;
use updraft_proto::v1::{CertificateReply, EnrollRequest, RenewRequest};

use crate::agent_api::Tier;
use crate::auth::Caller;

pub struct EnrollmentService<T> {
    tier: Arc<T>,
}

impl<T> EnrollmentService<T> {
    pub fn new(tier: Arc<T>) -> Self {
        Self { tier }
    }
}

#[tonic::async_trait]
impl<T: Tier> Enrollment for EnrollmentService<T> {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<CertificateReply>, Status> {
        let from = Caller::of(&request).and_then(|c| c.addr);
        Ok(Response::new(self.tier.enroll(request.into_inner(), from).await?))
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<CertificateReply>, Status> {
        let caller = Caller::of(&request).cloned().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = crate::auth::client_leaf(&request);
        Ok(Response::new(self.tier.renew(request.into_inner(), &caller, leaf).await?))
    }
}
