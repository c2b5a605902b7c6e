//! The gRPC Admin service: a thin adapter from tonic to the admin operations ([`Ops`]). It
//! names the caller for the log and turns the typed results into replies; the rules, the
//! validation and the access each operation needs live in `ops`. Who may call what is decided
//! before a call gets here, by the `auth` layer, from the operations table ([`crate::ops::Op`]).
use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use updraft_proto::v1::admin_server::Admin;
use updraft_proto::v1::{
    ApproveEnrollmentRequest, CreateJoinTokenRequest, JoinToken, ListCertificatesRequest, ListCertificatesResponse,
    RevokeCertificateRequest,
};
use updraft_proto::v1::{
    AssignRequest, ClearActivityRequest, ClearActivityResponse, DeleteUpdatesRequest, DeployRequest, Discovery,
    FleetReport, ForgetMachineRequest, ForgetMachineResponse, GetDiscoveryRequest, GetGroupRequest, GetMachineRequest,
    GetPairRequest, GetUpdateRequest, GroupDetail, ImportPendingRequest, ImportPendingResponse, ListActivityRequest,
    ListActivityResponse, ListAuditRequest, ListAuditResponse, ListCapsRequest, ListCapsResponse,
    ListDeploymentsRequest, ListDeploymentsResponse, ListGroupsRequest, ListGroupsResponse, ListMachinesRequest,
    ListMachinesResponse, ListPeersRequest, ListPeersResponse, ListPendingRequest, ListPendingResponse,
    ListUpdatesRequest, ListUpdatesResponse, ListUsersRequest, ListUsersResponse, ListWatchesRequest,
    ListWatchesResponse, MachineDetail, PairReply, Peer, PinRequest, PrestageRequest, ProductLineCap, PutGroupRequest,
    RelatedInstallsRequest, RemoveGroupRequest, RemovePeerRequest, RemoveUserRequest, RemoveWatchRequest,
    ReportRequest2, SetPasswordRequest, SetPasswordResponse, SetPriorityRequest, SetRoleRequest, SetUpdateStateRequest,
    Update, UpdateDetail, UploadChunk, User, WatchFolder, upload_chunk,
};

use crate::error::{ProviderError, Result};
use crate::ops::Ops;

pub struct AdminService {
    ops: Arc<Ops>,
}

/// Who is asking: the name and role in the caller's certificate (see `auth`), or, on a
/// plaintext (`--insecure`) provider, what admin-cli claims.
pub(crate) fn who<T>(req: &Request<T>) -> String {
    if let Some(c) = crate::auth::Caller::of(req) {
        return c.describe();
    }
    let user = req
        .metadata()
        .get(crate::auth::CLAIMED_USER.as_str())
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().filter(|c| !c.is_control()).take(64).collect::<String>())
        .unwrap_or_else(|| "unknown".into());
    match req.remote_addr() {
        Some(a) => format!("{user} ({a})"),
        None => user,
    }
}

impl AdminService {
    pub fn new(ops: Arc<Ops>) -> Self {
        Self { ops }
    }

    /// Drives a client-streamed upload (a header, then the package's bytes) into the import.
    async fn upload(&self, mut stream: Streaming<UploadChunk>, who: &str) -> Result<Update> {
        let header = match stream.next().await {
            Some(Ok(UploadChunk { part: Some(upload_chunk::Part::Header(h)) })) => h,
            Some(Err(e)) => return Err(ProviderError::InvalidArgument(format!("upload failed: {}", e.message()))),
            _ => return Err(ProviderError::InvalidArgument("upload must start with a header".into())),
        };
        let mut rx = self.ops.start_upload(&header)?;
        while let Some(msg) = stream.next().await {
            let msg =
                msg.map_err(|e| ProviderError::InvalidArgument(format!("upload interrupted: {}", e.message())))?;
            let Some(upload_chunk::Part::Data(data)) = msg.part else {
                return Err(ProviderError::InvalidArgument("a second header in one upload".into()));
            };
            self.ops.upload_data(&header, &mut rx, &data).await?;
        }
        self.ops.finish_upload(who, &header, rx).await
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_update(&self, request: Request<Streaming<UploadChunk>>) -> Result<Response<Update>, Status> {
        let who = who(&request);
        Ok(Response::new(self.upload(request.into_inner(), &who).await?))
    }

    async fn list_updates(
        &self,
        request: Request<ListUpdatesRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        Ok(Response::new(self.ops.list_updates(request.into_inner()).await?))
    }
    async fn get_update(&self, request: Request<GetUpdateRequest>) -> Result<Response<UpdateDetail>, Status> {
        Ok(Response::new(self.ops.get_update(request.into_inner()).await?))
    }
    async fn set_update_state(
        &self,
        request: Request<SetUpdateStateRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.set_update_state(&who, request.into_inner()).await?))
    }
    async fn set_priority(
        &self,
        request: Request<SetPriorityRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.set_priority(&who, request.into_inner()).await?))
    }
    async fn prestage(&self, request: Request<PrestageRequest>) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.prestage(&who, request.into_inner()).await?))
    }
    async fn delete_updates(
        &self,
        request: Request<DeleteUpdatesRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.delete_updates(&who, request.into_inner()).await?))
    }
    async fn set_related_installs(
        &self,
        request: Request<RelatedInstallsRequest>,
    ) -> Result<Response<ListUpdatesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.set_related_installs(&who, request.into_inner()).await?))
    }
    async fn set_cap(&self, request: Request<ProductLineCap>) -> Result<Response<ListCapsResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.set_cap(&who, request.into_inner()).await?))
    }
    async fn list_caps(&self, _request: Request<ListCapsRequest>) -> Result<Response<ListCapsResponse>, Status> {
        Ok(Response::new(self.ops.list_caps().await?))
    }
    async fn add_watch(&self, request: Request<WatchFolder>) -> Result<Response<ListWatchesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.add_watch(&who, request.into_inner()).await?))
    }
    async fn remove_watch(
        &self,
        request: Request<RemoveWatchRequest>,
    ) -> Result<Response<ListWatchesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.remove_watch(&who, request.into_inner()).await?))
    }
    async fn list_watches(
        &self,
        _request: Request<ListWatchesRequest>,
    ) -> Result<Response<ListWatchesResponse>, Status> {
        Ok(Response::new(self.ops.list_watches().await?))
    }
    async fn list_pending(
        &self,
        request: Request<ListPendingRequest>,
    ) -> Result<Response<ListPendingResponse>, Status> {
        Ok(Response::new(self.ops.list_pending(request.into_inner()).await?))
    }
    async fn import_pending(
        &self,
        request: Request<ImportPendingRequest>,
    ) -> Result<Response<ImportPendingResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.import_pending(&who, request.into_inner()).await?))
    }
    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        Ok(Response::new(self.ops.list_machines(request.into_inner()).await?))
    }
    async fn get_machine(&self, request: Request<GetMachineRequest>) -> Result<Response<MachineDetail>, Status> {
        Ok(Response::new(self.ops.get_machine(request.into_inner()).await?))
    }
    async fn put_group(&self, request: Request<PutGroupRequest>) -> Result<Response<GroupDetail>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.put_group(&who, request.into_inner()).await?))
    }
    async fn remove_group(&self, request: Request<RemoveGroupRequest>) -> Result<Response<ListGroupsResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.remove_group(&who, request.into_inner()).await?))
    }
    async fn list_groups(&self, _request: Request<ListGroupsRequest>) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(self.ops.list_groups().await?))
    }
    async fn get_group(&self, request: Request<GetGroupRequest>) -> Result<Response<GroupDetail>, Status> {
        Ok(Response::new(self.ops.get_group(request.into_inner()).await?))
    }
    async fn assign(&self, request: Request<AssignRequest>) -> Result<Response<ListMachinesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.assign(&who, request.into_inner()).await?))
    }
    async fn pin(&self, request: Request<PinRequest>) -> Result<Response<ListMachinesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.pin(&who, request.into_inner()).await?))
    }
    async fn report(&self, request: Request<ReportRequest2>) -> Result<Response<FleetReport>, Status> {
        Ok(Response::new(self.ops.report(request.into_inner()).await?))
    }
    async fn deploy(&self, request: Request<DeployRequest>) -> Result<Response<ListDeploymentsResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.deploy(&who, request.into_inner()).await?))
    }
    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        Ok(Response::new(self.ops.list_deployments(request.into_inner()).await?))
    }
    async fn set_role(&self, request: Request<SetRoleRequest>) -> Result<Response<ListMachinesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.set_role(&who, request.into_inner()).await?))
    }
    async fn forget_machine(
        &self,
        request: Request<ForgetMachineRequest>,
    ) -> Result<Response<ForgetMachineResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.forget_machine(&who, request.into_inner()).await?))
    }
    async fn get_pair(&self, _request: Request<GetPairRequest>) -> Result<Response<PairReply>, Status> {
        Ok(Response::new(self.ops.get_pair()?))
    }
    async fn put_peer(&self, request: Request<Peer>) -> Result<Response<ListPeersResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.put_peer(&who, request.into_inner()).await?))
    }
    async fn remove_peer(&self, request: Request<RemovePeerRequest>) -> Result<Response<ListPeersResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.remove_peer(&who, request.into_inner().name).await?))
    }
    async fn list_peers(&self, _request: Request<ListPeersRequest>) -> Result<Response<ListPeersResponse>, Status> {
        Ok(Response::new(self.ops.list_peers()?))
    }
    async fn set_discovery(&self, request: Request<Discovery>) -> Result<Response<Discovery>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.set_discovery(&who, request.into_inner()).await?))
    }
    async fn get_discovery(&self, _request: Request<GetDiscoveryRequest>) -> Result<Response<Discovery>, Status> {
        Ok(Response::new(self.ops.get_discovery()?))
    }
    async fn put_user(&self, request: Request<User>) -> Result<Response<ListUsersResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.put_user(&who, request.into_inner()).await?))
    }
    async fn remove_user(&self, request: Request<RemoveUserRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.remove_user(&who, request.into_inner()).await?))
    }
    async fn list_users(&self, _request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        Ok(Response::new(self.ops.list_users().await?))
    }
    async fn list_audit(&self, request: Request<ListAuditRequest>) -> Result<Response<ListAuditResponse>, Status> {
        Ok(Response::new(self.ops.list_audit(request.into_inner()).await?))
    }
    async fn clear_activity(
        &self,
        request: Request<ClearActivityRequest>,
    ) -> Result<Response<ClearActivityResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.clear_activity(&who, request.into_inner()).await?))
    }
    async fn list_activity(
        &self,
        request: Request<ListActivityRequest>,
    ) -> Result<Response<ListActivityResponse>, Status> {
        Ok(Response::new(self.ops.list_activity(request.into_inner()).await?))
    }
    async fn set_password(
        &self,
        request: Request<SetPasswordRequest>,
    ) -> Result<Response<SetPasswordResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.set_password(&who, request.into_inner()).await?))
    }

    async fn create_join_token(&self, request: Request<CreateJoinTokenRequest>) -> Result<Response<JoinToken>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.create_join_token(&who, request.into_inner()).await?))
    }

    async fn list_certificates(
        &self,
        request: Request<ListCertificatesRequest>,
    ) -> Result<Response<ListCertificatesResponse>, Status> {
        Ok(Response::new(self.ops.list_certificates(request.into_inner()).await?))
    }

    async fn approve_enrollment(
        &self,
        request: Request<ApproveEnrollmentRequest>,
    ) -> Result<Response<ListCertificatesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.approve_enrollment(&who, request.into_inner()).await?))
    }

    async fn preview_rollout(
        &self,
        request: Request<updraft_proto::v1::PreviewRolloutRequest>,
    ) -> Result<Response<updraft_proto::v1::RolloutPreview>, Status> {
        Ok(Response::new(self.ops.preview_rollout(request.into_inner()).await?))
    }

    async fn start_rollout(
        &self,
        request: Request<updraft_proto::v1::StartRolloutRequest>,
    ) -> Result<Response<updraft_proto::v1::RolloutReport>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.start_rollout(&who, request.into_inner()).await?))
    }

    async fn get_rollout(
        &self,
        request: Request<updraft_proto::v1::GetRolloutRequest>,
    ) -> Result<Response<updraft_proto::v1::RolloutReport>, Status> {
        Ok(Response::new(self.ops.get_rollout(request.into_inner()).await?))
    }

    async fn list_rollouts(
        &self,
        _request: Request<updraft_proto::v1::ListRolloutsRequest>,
    ) -> Result<Response<updraft_proto::v1::ListRolloutsResponse>, Status> {
        Ok(Response::new(self.ops.list_rollouts().await?))
    }

    async fn resume_rollout(
        &self,
        request: Request<updraft_proto::v1::ResumeRolloutRequest>,
    ) -> Result<Response<updraft_proto::v1::RolloutReport>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.resume_rollout(&who, request.into_inner()).await?))
    }

    async fn revert_rollout(
        &self,
        request: Request<updraft_proto::v1::GetRolloutRequest>,
    ) -> Result<Response<updraft_proto::v1::RolloutReport>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.revert_rollout(&who, request.into_inner()).await?))
    }

    async fn revoke_certificate(
        &self,
        request: Request<RevokeCertificateRequest>,
    ) -> Result<Response<ListCertificatesResponse>, Status> {
        let who = who(&request);
        Ok(Response::new(self.ops.revoke_certificate(&who, request.into_inner()).await?))
    }
}
