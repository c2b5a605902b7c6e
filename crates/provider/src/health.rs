//! gRPC health checking (`grpc.health.v1`) and server reflection, for load balancers, probes and
//! tools such as grpcurl. Both sit behind the same authentication as every other call: any of
//! this deployment's certificates may ask. The active provider and a site report every service
//! SERVING until they stop; a standby reports itself and the admin API NOT_SERVING (it only
//! forwards), so a load balancer can tell the active from the standby.
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use updraft_proto::v1::admin_server::AdminServer;
use updraft_proto::v1::agent_api_server::AgentApiServer;
use updraft_proto::v1::replication_server::ReplicationServer;

use crate::error::{ProviderError, Result};

/// The server as a whole (the empty service name). The services' names, here and in `auth`'s
/// access rules, come from the generated servers.
pub const SERVER: &str = "";
pub const AGENT_API: &str = <AgentApiServer<()> as NamedService>::NAME;
pub const REPLICATION: &str = <ReplicationServer<()> as NamedService>::NAME;
pub const ADMIN: &str = <AdminServer<()> as NamedService>::NAME;
pub const ENROLLMENT: &str = <updraft_proto::v1::enrollment_server::EnrollmentServer<()> as NamedService>::NAME;

/// Sets each named service's status.
pub async fn report(health: &HealthReporter, statuses: &[(&str, bool)]) {
    for (name, serving) in statuses {
        let status = if *serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        health.set_service_status(*name, status).await;
    }
}

/// Reflection over the updraft.v1 and health services.
pub fn reflection()
-> Result<tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(updraft_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ProviderError::Io(format!("reflection: {e}")))
}
